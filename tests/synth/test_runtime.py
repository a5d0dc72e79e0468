"""Device, precision and optimizer choices of synth.runtime."""

import torch

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
