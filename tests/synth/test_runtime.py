"""Device, precision and optimizer choices of synth.runtime."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from render.shard import worker_environment
from synth.engine import _amp_dtype
from synth.runtime import cpu_has_native_bf16

AVX2_EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512_SKYLAKE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512vl avx512dq\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile\n"


def test_native_bf16_only_where_the_cpu_flags_say_so():
    assert not cpu_has_native_bf16(AVX2_EPYC)
    assert not cpu_has_native_bf16(AVX512_SKYLAKE)  # oneDNN calls this bf16-capable: it emulates, slower than fp32
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    assert not cpu_has_native_bf16("")


def test_amp_auto_on_this_cpu_follows_its_flags():
    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert _amp_dtype("auto", torch.device("cpu")) is expected
    assert _amp_dtype("off", torch.device("cpu")) is None
    assert _amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_is_accepted_by_glibc():
    # In a child process: the settings last for the life of the process that makes them. Their effect on speed is
    # measured by bench/loader.py (page faults depend on the whole allocation history, too noisy for a test).
    code = "from synth.runtime import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], env=worker_environment(), check=True, capture_output=True,
                         text=True, cwd=Path(__file__).parents[2]).stdout
    assert out.split()[-1] == "True"
