"""Which CPUs get uint8 weights: x86 without VNNI, where ORT's u8s8 kernels saturate."""

from __future__ import annotations

import pytest

from dgconvert.convert.quantize import QuantizeError, QuantizeSettings, weights_for_cpu
from dgconvert.runtime.cpu_features import cpu_flags, u8s8_saturates

EPYC_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n"
XEON_VNNI = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_int8\n"
ALDER_LAKE = "flags\t\t: avx2 avx_vnni\n"


def test_saturation_is_read_from_the_flags() -> None:
    assert cpu_flags(EPYC_AVX2) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert u8s8_saturates(EPYC_AVX2) and weights_for_cpu(EPYC_AVX2) == "uint8"
    for info in (XEON_VNNI, ALDER_LAKE):
        assert not u8s8_saturates(info) and weights_for_cpu(info) == "int8"
    assert cpu_flags("processor\t: 0\n") is None and not u8s8_saturates("processor\t: 0\n")


def test_weights_setting_is_checked_and_recorded() -> None:
    assert QuantizeSettings(weights="int8").to_dict()["weights"] == "int8"
    auto = QuantizeSettings().to_dict()
    assert auto["weights"] == weights_for_cpu() and auto["weights_choice"] == "auto"
    with pytest.raises(QuantizeError, match="weights is 'int4'"):
        QuantizeSettings(weights="int4").check()
