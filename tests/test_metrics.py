import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.classification import MulticlassJaccardIndex

from flowseg.encoding import IGNORE_INDEX
from flowseg.metrics import ConfusionMatrix

I = IGNORE_INDEX


def test_hand_worked_two_images():
    # image A: gt [[0, 0], [1, I]] pred [[0, 1], [1, 2]]; image B: gt [[2, 2], [1, 0]] pred [[2, 0], [1, 0]]
    # confusion rows (gt) / cols (pred): [[2, 1, 0], [0, 2, 0], [1, 0, 1]], class 3 never appears
    # IoU = 2/(3+3-2), 2/(2+3-2), 1/(2+1-1) = 1/2, 2/3, 1/2 -> mIoU = 5/9; pixel acc 5/7;
    # class acc 2/3, 1, 1/2 -> 13/18
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[[0, 1], [1, 2]]]), torch.tensor([[[0, 0], [1, I]]]))
    cm.update(torch.tensor([[[2, 0], [1, 0]]]), torch.tensor([[[2, 2], [1, 0]]]))
    m = cm.compute()
    assert m.confusion.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert m.iou[:3] == pytest.approx([1 / 2, 2 / 3, 1 / 2]) and math.isnan(m.iou[3])
    assert m.miou == pytest.approx(5 / 9)
    assert m.pixel_accuracy == pytest.approx(5 / 7)
    assert m.class_accuracy[:3] == pytest.approx([2 / 3, 1, 1 / 2]) and math.isnan(m.class_accuracy[3])
    assert m.mean_class_accuracy == pytest.approx(13 / 18)


def test_agrees_with_torchmetrics_on_random_data():
    n = 9
    g = torch.Generator().manual_seed(0)
    ours = ConfusionMatrix(n)
    macro = MulticlassJaccardIndex(num_classes=n, ignore_index=I, average="macro")
    per_class = MulticlassJaccardIndex(num_classes=n, ignore_index=I, average="none")
    for _ in range(4):
        target = torch.randint(0, n - 2, (2, 16, 16), generator=g)  # classes 7, 8 never in the ground truth
        wrong = torch.randint(0, n - 1, (2, 16, 16), generator=g)
        pred = torch.where(torch.rand(2, 16, 16, generator=g) < 0.6, target, wrong)
        target[torch.rand(2, 16, 16, generator=g) < 0.1] = I
        ours.update(pred, target)
        macro.update(pred, target)
        per_class.update(pred, target)
    m = ours.compute()
    iou = torch.tensor(m.iou, dtype=torch.float64)
    present = ~iou.isnan()
    assert present.sum() == n - 1  # class 7 is predicted somewhere, class 8 appears nowhere
    assert m.miou == pytest.approx(macro.compute().item(), abs=1e-6)
    assert torch.allclose(iou[present], per_class.compute().double()[present], atol=1e-6)


def test_reset_and_ignore_only_batches():
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), I))
    m = cm.compute()
    assert cm.confusion.sum() == 0 and math.isnan(m.miou) and math.isnan(m.pixel_accuracy)
    cm.update(torch.ones(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.long))
    assert cm.compute().miou == 1.0
    cm.reset()
    assert cm.confusion.sum() == 0


def test_bad_input():
    cm = ConfusionMatrix(3)
    ok = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"target has values outside \[0, 3\).*\[3\]"):
        cm.update(ok, torch.tensor([[[0, 3], [I, 1]]]))
    with pytest.raises(ValueError, match=r"pred has values outside \[0, 3\)"):
        cm.update(torch.tensor([[[0, -1], [0, 0]]]), ok)
    with pytest.raises(ValueError, match="must both be"):
        cm.update(ok, torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="pred must be an integer tensor"):
        cm.update(ok.float(), ok)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        ConfusionMatrix(1)
    with pytest.raises(ValueError, match="collides"):
        ConfusionMatrix(300)


def _merge_worker(rank: int, world: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[[rank, 2]]]), torch.tensor([[[rank, 1]]]))
    cm.all_reduce()
    queue.put((rank, cm.confusion.tolist()))
    dist.destroy_process_group()


def test_all_reduce_in_a_single_process_group(tmp_path):
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[[0, 2]]]), torch.tensor([[[0, 1]]]))
    cm.all_reduce()  # not initialised: a no-op
    assert cm.confusion.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        cm.all_reduce()
    finally:
        dist.destroy_process_group()
    assert cm.confusion.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]


@pytest.mark.slow  # spawns two interpreters (~12 s on 2 busy cores)
def test_all_reduce_merges_two_processes(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_merge_worker, args=(r, 2, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # rank 0 adds (0,0) and (1,2); rank 1 adds (1,1) and (1,2)
    expected = [[1, 0, 0], [0, 1, 2], [0, 0, 0]]
    assert results == {0: expected, 1: expected}
