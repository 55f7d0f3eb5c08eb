"""Several weighted caches, repeats (kohya N_name folders) and a regularization set in one run
(oboro_model/training/datasets.py): counted sampled frequencies match the configured weights and
repeats, every step is one bucket of one source, the order resumes exactly, and the regularization
loss weight multiplies exactly the regularization steps' loss."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from oboro.oboro_model import MMHDiT, preset
from oboro.oboro_model.training import TrainConfig, Trainer
from oboro.oboro_model.training.datasets import (DataSource, MixedData, open_training_data, parse_data_config,
                                                 parse_source_lines, repeats_in_name)

CFG = preset("tiny", in_channels=3)
pytestmark = pytest.mark.usefixtures("one_thread")


class Cache(torch.utils.data.Dataset):
    """A latent cache's reading interface (folder, manifest items, bucket_of, items as tensors) over
    tiny generated latents: what MixedData needs of a LatentCache, without encoding images."""

    def __init__(self, folder: str, files: list[str], buckets: list[tuple], seed: int):
        self.folder, self.dataset_dir = Path(folder), None
        self.items = [{"file": f, "bucket": list(b)} for f, b in zip(files, buckets)]
        g = torch.Generator().manual_seed(seed)
        self.latents = [torch.randn(3, b[1] // 8, b[0] // 8, generator=g) for b in buckets]
        self.text = torch.randn(len(files), 4, 32, generator=g)
        self.empty_text = self.empty_mask = None

    def __len__(self):
        return len(self.items)

    def bucket_of(self, i):
        return tuple(self.items[i]["bucket"])

    def __getitem__(self, i):
        return {"latent": self.latents[i].clone(), "text": self.text[i], "text_mask": torch.ones(4),
                "file": self.items[i]["file"]}


def sources():
    """A: folder 3_alpha (repeats 3), 4 items in two buckets. B: weight 0.5, 4 items in a kohya
    sub-folder 2_x (repeats 2) + 4 plain. Reg: 4 items, loss weight 0.25, default (balanced) weight."""
    a = Cache("/data/3_alpha", [f"a{i}.png" for i in range(4)], [(64, 64), (64, 64), (64, 48), (64, 48)], 0)
    b = Cache("/data/beta", [f"2_x/b{i}.png" for i in range(4)] + [f"b{i}.png" for i in range(4, 8)],
              [(64, 64)] * 8, 1)
    r = Cache("/data/reg", [f"r{i}.png" for i in range(4)], [(64, 64)] * 4, 2)
    return [a, b, r], [DataSource("/data/3_alpha"), DataSource("/data/beta", weight=0.5),
                       DataSource("/data/reg", loss_weight=0.25, reg=True)]


def test_parsing_and_folder_names():
    assert [repeats_in_name(n) for n in ("10_style", "3_a_b", "style", "0_x", "10")] == [10, 3, None, None, None]
    got = parse_source_lines("# comment\n/c/one 2 3\n\n/c/two words 0.5\nrel\n")
    assert got == [DataSource("/c/one", 2.0, 3), DataSource("/c/two words", 0.5), DataSource("rel")]
    with pytest.raises(ValueError, match="repeats must be a whole number"):
        parse_source_lines("/c 1 2.5")
    assert parse_data_config({"path": "c"}) == [DataSource("c")]
    assert parse_data_config([{"path": "c", "repeats": 2}, {"path": "r", "reg": True, "loss_weight": 0.5}]) == [
        DataSource("c", repeats=2), DataSource("r", loss_weight=0.5, reg=True)]
    with pytest.raises(ValueError, match=r"\[\[data\]\] #1: unknown keys \['wieght'\]"):
        parse_data_config([{"path": "c", "wieght": 2}])
    with pytest.raises(ValueError, match="every entry is a regularization set"):
        parse_data_config([{"path": "r", "reg": True}])
    one = Cache("/data/plain", ["a.png"], [(64, 64)], 0)  # one plain source: the cache itself, old order
    assert open_training_data([DataSource("/data/plain")], lambda p: one) is one


def test_sampled_frequencies_match_weights_and_repeats():
    """Masses: A 1 x 4 x 3 = 12, B 0.5 x (4 x 2 + 4) = 6, reg balanced to 18: shares 1/3, 1/6, 1/2;
    within a source, items in proportion to their repeats. Counted over 3000 steps of batch 2:
    source shares within 0.01 absolute, every item within 15% of its expected count."""
    caches, srcs = sources()
    data = MixedData(caches, srcs)
    assert data.weights == [1.0, 0.5, 4.5]
    assert data.shares() == pytest.approx([1 / 3, 1 / 6, 1 / 2])
    order = data.data_order(torch.Generator().manual_seed(0))
    count, steps = Counter(), 3000
    for _ in range(steps):
        idx = order.take(2)
        assert len({data.bucket_of(i) for i in idx}) == 1  # one bucket per step...
        assert len({data.locate(i)[0] for i in idx}) == 1  # ...and one source
        count.update(idx)
    n = 2 * steps
    per_source = [sum(c for i, c in count.items() if data.locate(i)[0] == s) / n for s in range(3)]
    assert per_source == pytest.approx([1 / 3, 1 / 6, 1 / 2], abs=0.01)
    expected = {}
    for s, share in enumerate(data.shares()):
        reps = data.repeats[s]
        for j, r in enumerate(reps):
            expected[data.offsets[s] + j] = n * share * r / sum(reps)
    assert data.repeats[1] == [2, 2, 2, 2, 1, 1, 1, 1]
    assert set(count) == set(expected)
    assert max(abs(count[i] / expected[i] - 1) for i in expected) < 0.15


def run(tmp_path=None, until=None, resume=False, loss_weight=0.25, lr=1e-3):
    caches, srcs = sources()
    srcs[2] = DataSource("/data/reg", loss_weight=loss_weight, reg=True)
    model = MMHDiT(CFG).initialize_weights(torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=6, batch_size=2, lr=lr, caption_dropout=0.2, spike_guard=False, warmup=0,
                      output_dir=None if tmp_path is None else str(tmp_path), checkpoint_every=0)
    tr = Trainer(model, MixedData(caches, srcs), cfg)
    if resume:
        tr.resume(tmp_path)
    log = []
    tr.train(lambda step, loss, lr_, rate: log.append((step, loss, sorted(int(i) for i in tr._batch_items))),
             until=until)
    return tr, log


def test_mixture_resumes_exactly(tmp_path):
    straight, want = run()
    run(tmp_path, until=3)
    resumed, got = run(tmp_path, resume=True)
    assert [s for s, _, _ in got] == [4, 5, 6]
    assert [b for _, _, b in got] == [b for _, _, b in want[3:]]  # the same batches...
    for (n, p), (_, q) in zip(straight.params, resumed.params):  # ...and the same weights (one process)
        assert torch.equal(p, q), n
    assert (straight.order.tolist(), straight.epoch, straight.pos) == (resumed.order.tolist(), resumed.epoch,
                                                                       resumed.pos)


def test_reg_loss_weight_scales_exactly_the_reg_steps():
    """lr 0: both runs see the same model, batches and noise; reg steps' losses differ by 0.25."""
    _, full = run(loss_weight=1.0, lr=0.0)
    data = MixedData(*sources())
    _, weighted = run(loss_weight=0.25, lr=0.0)
    reg_steps = 0
    for (s, a, batch), (_, b, batch2) in zip(full, weighted):
        assert batch == batch2
        if data.locate(batch[0])[0] == 2:
            reg_steps += 1
            assert b == pytest.approx(0.25 * a, rel=1e-5)
        else:
            assert b == a
    assert reg_steps > 0
