import os
import stat

from pretrain.utils import atomic_write_bytes, atomic_write_json


def test_atomic_writes_honour_the_umask(tmp_path):
    # Teammates share shards and checkpoints: a 0600 file (mkstemp's mode) locks them out.
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_json(tmp_path / "sub" / "b.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    for name in ("a.bin", "sub/b.json"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o666 & ~mask, (name, oct(mode))
    assert not [p for p in tmp_path.rglob("*.tmp")]
