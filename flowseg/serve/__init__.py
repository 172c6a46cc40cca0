"""`flowseg serve`: a local web page (Gradio) that shows trained models at work on an image.

    views.py   what the page shows, without the page: uploads read within limits, a model run at
               the page's settings, its pictures (label map, overlay, confidence, legend, trajectory)
    page.py    the Gradio page around them, and serve(), which loads the checkpoints once and starts it
"""
