"""Issue 13, case 6 on the training engine: a state temp file left by a process killed mid-write is
removed when the next run starts (a real SIGKILL during a real write), and the spike guard sets
aside an item that spikes again and again, names it, and stops cutting the LR for it."""
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from oboro.oboro_model import MMHDiT, preset
from oboro.oboro_model.training import TrainConfig, Trainer, list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = preset("tiny", in_channels=3)
REPO = Path(__file__).resolve().parents[1]


class Items(torch.utils.data.Dataset):
    """8 named items; `bad` returns a NaN latent every time it is drawn (a corrupt file)."""

    def __init__(self, n=8, bad=None):
        g = torch.Generator().manual_seed(0)
        self.latents, self.text = torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 4, 32, generator=g)
        self.bad = bad

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        latent = self.latents[i].clone()
        if i == self.bad:
            latent.fill_(float("nan"))
        return {"latent": latent, "text": self.text[i], "text_mask": torch.ones(4), "file": f"img{i}.png"}


def trainer(ds, **kw):
    model = MMHDiT(CFG).initialize_weights(torch.Generator().manual_seed(0))
    return Trainer(model, ds, TrainConfig(**{"steps": 24, "batch_size": 2, "lr": 1e-3, "caption_dropout": 0.0,
                                             "spike_warmup": 2, "spike_factor": 0.5, **kw}))


def test_repeat_spiker_is_quarantined_by_name_and_lr_cut_once(caplog, tmp_path):
    ds = Items(bad=5)
    tr = trainer(ds, output_dir=str(tmp_path / "run"), checkpoint_every=12)
    with caplog.at_level(logging.WARNING):
        losses = tr.train()
    g = tr.guard
    assert g.quarantined == {"5": "img5.png"} and g.item_spikes["5"] == 2
    assert g.spikes == 2 and g.lr_scale == 0.5  # the first spike cut the LR, the repeat did not
    assert "img5.png spiked in 2 steps: set aside for the rest of the run (LR not cut)" in caplog.text
    first_nan = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    assert len(first_nan) == 2 and all(math.isfinite(v) for v in losses[first_nan[-1] + 1:])  # never drawn again
    # the quarantine is guard state: resuming from the step-12 state ends where the straight run did
    again = trainer(Items(bad=5), output_dir=str(tmp_path / "run"), checkpoint_every=12)
    again.resume(list_checkpoints(tmp_path / "run")[0])
    again.train()
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(tr.params, again.params))
    assert again.guard.state_dict() == g.state_dict()


def test_clean_run_is_unchanged_by_the_quarantine_logic():
    a, b = trainer(Items()), trainer(Items())
    a.train()
    for _ in range(24):  # the same steps by hand: no item quarantined, data order untouched
        b.train_step()
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a.params, b.params)) and not a.guard.quarantined


def test_temp_file_of_a_killed_state_write_is_removed_at_the_next_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # a real process killed (SIGKILL) while it writes a state through the real atomic writer
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / 'scripts')!r})
        import oboro_env; oboro_env.import_oboro()
        import safetensors.torch as st
        from oboro.oboro_model.training import state
        real = st.save_file
        def slow(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            print("written", flush=True)
            time.sleep(600)   # killed here: the temp file is complete, never renamed
        import oboro.oboro_model.atomic as atomic
        atomic.save_file = slow
        import torch
        state.write_state(state.checkpoint_path({str(out)!r}, 3), {{"w": torch.ones(1000)}}, {{"format": 1}})
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "written"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    left = [q.name for q in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".step_00000003.safetensors.") and left[0].endswith(".tmp")
    (out / "notes.tmp").write_text("not a state temp file")
    trainer(Items(), output_dir=str(out))  # the next run starts
    assert sorted(q.name for q in out.iterdir()) == ["notes.tmp"]
