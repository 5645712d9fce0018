import subprocess
import sys

from conftest import ROOT


def test_bench_cpu_preset_prints_every_row_and_column():
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--preset", "cpu", "--new_tokens", "8",
                        "--batch_size", "2", "--seq_len", "64", "--compile", "false"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    for row in ("train, ours", "train, transformers", "decode, ours", "decode, transformers"):
        line = next(l for l in lines if l.startswith(row + " "))
        assert float(line.split()[2]) > 0
    for row in ("train, ours", "train, transformers"):
        line = next(l for l in lines if l.startswith(row + " "))
        assert "tokens/s" in line and "MFU" in line and "peak memory" in line and "GiB" in line
