"""CMakeLists.txt's kernel compile units (CPU only: configured with LITEATTN_BUILD_CUDA=OFF, nothing compiled).

Every instantiation that tile_shapes.json asks for must land in exactly one unit, whatever LITEATTN_KERNEL_UNITS
says; units of several instantiations must mix dense / skip and 16-bit / INT8 kernels (they differ in cost); files
of an earlier unit count must go; a bad count must fail the configure with a message that names the option."""

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
pytestmark = pytest.mark.skipif(CMAKE is None, reason="needs cmake on PATH")

INSTANCE = re.compile(r"^LITEATTN_INSTANTIATE_FWD(?:_DEFAULT|_AB)?\((.*)\)$", re.M)


def expected_instances():
    shapes = json.loads((ROOT / "liteattn_ops" / "core" / "tile_shapes.json").read_text())["shapes"]
    dtypes = {"bfloat16": "kBFloat16", "float16": "kFloat16"}
    return Counter(f"{dtypes[s['dtype']]}, {s['head_dim']}, {skip}, {int8}"
                   for s in shapes for skip in ("false", "true") for int8 in ("false", "true"))


def configure(build, units, ab=""):
    return subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(build), "-DLITEATTN_BUILD_CUDA=OFF",
                           f"-DLITEATTN_KERNEL_UNITS={units}", f"-DLITEATTN_AB_VARIANTS={ab}"],
                          capture_output=True, text=True)


def units_of(build):
    return {f.name: INSTANCE.findall(f.read_text()) for f in sorted((build / "generated" / "instantiations").glob("*.cu"))}


@pytest.mark.parametrize("units", [1, 2, 3, 5, 100])
def test_every_instantiation_in_exactly_one_unit(tmp_path, units):
    result = configure(tmp_path, units)
    assert result.returncode == 0, result.stderr
    found = units_of(tmp_path)
    expected = expected_instances()
    assert len(found) == min(units, sum(expected.values()))
    assert Counter(i for instances in found.values() for i in instances) == expected
    sizes = [len(v) for v in found.values()]
    assert max(sizes) - min(sizes) <= 1, sizes  # as even as the count allows
    if units >= sum(expected.values()):  # one per file, named after it
        assert "fwd_bf16_d128_skip_int8_default.cu" in found and "fwd_fp16_d64_dense_default.cu" in found


def test_units_mix_paths_and_modes(tmp_path):
    assert configure(tmp_path, 2).returncode == 0
    for name, instances in units_of(tmp_path).items():
        fields = [i.split(", ") for i in instances]
        assert {f[2] for f in fields} == {"false", "true"}, name  # dense and skip
        assert {f[3] for f in fields} == {"false", "true"}, name  # 16-bit and INT8


def test_ab_variants_are_spread_too(tmp_path):
    assert configure(tmp_path, 4, ab="23555@128").returncode == 0
    instances = [i for v in units_of(tmp_path).values() for i in v]
    assert sum("23555" in i for i in instances) == 4  # bf16 d128: dense / skip x 16-bit / INT8
    assert len(instances) == sum(expected_instances().values()) + 4


def test_a_new_count_removes_the_old_files(tmp_path):
    assert configure(tmp_path, 100).returncode == 0
    assert configure(tmp_path, 3).returncode == 0
    assert sorted(units_of(tmp_path)) == ["fwd_unit1_of3.cu", "fwd_unit2_of3.cu", "fwd_unit3_of3.cu"]


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_bad_count_fails_naming_the_option(tmp_path, bad):
    result = configure(tmp_path, bad)
    assert result.returncode != 0
    assert "LITEATTN_KERNEL_UNITS" in result.stderr and bad in result.stderr
