"""A second writer in its own process, for tests/test_hardening_locks.py: the locks must hold
between real processes (an OS flock), which one process taking a lock twice cannot show.

  python lock_holder.py build DATASET FOLDER READY GO   build a latent cache of DATASET into FOLDER
      with the core build_cache; once it is encoding (so holding the folder lock) it writes READY
      and waits until the file GO exists, then finishes. Exit 3 with the error on FolderBusy.
  python lock_holder.py hold FOLDER READY               hold FOLDER's lock (as another run writing
      there would) until stdin closes.
Waiting on files, not on time: the test decides when the holder lets go.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import oboro_env  # noqa: E402

oboro_env.import_oboro()
import torch  # noqa: E402

from oboro.oboro_model.data import OboroDataset, build_cache  # noqa: E402
from oboro.oboro_model.folder_lock import FolderBusy, folder_lock  # noqa: E402


def wait_for(path: Path, limit: float = 300) -> None:
    end = time.monotonic() + limit  # a safety net so a broken test cannot leave this process behind
    while not path.exists():
        if time.monotonic() > end:
            sys.exit(f"{path} never appeared")
        time.sleep(0.05)


def build(dataset: str, folder: str, ready: Path, go: Path) -> int:
    def encode_image(pixels):
        if not ready.exists():
            ready.write_text("encoding")
            wait_for(go)
        return torch.nn.functional.avg_pool2d(pixels, 8)

    def encode_text(captions):
        hidden = [torch.full((1, 4, 8), float(len(c))) for c in captions]
        return hidden, [torch.ones(1, 4, dtype=torch.long) for _ in captions]

    ds = OboroDataset(dataset, policy="fixed", size=(32, 32))
    try:
        report = build_cache(ds, folder, encode_image, encode_text, {"vae": "fake", "t5": "fake"}, batch_size=1,
                             what=f"lock_holder build of {dataset}")
    except FolderBusy as e:
        print(f"FolderBusy: {e}", file=sys.stderr)
        return 3
    print(f"built {report['items']} items")
    return 0


def hold(folder: str, ready: Path) -> int:
    with folder_lock(folder, "lock_holder hold"):
        ready.write_text("held")
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "build":
        sys.exit(build(rest[0], rest[1], Path(rest[2]), Path(rest[3])))
    sys.exit(hold(rest[0], Path(rest[1])))
