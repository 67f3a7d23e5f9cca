import pytest

from pfq_edge.errors import ProfileError
from pfq_edge.targets.profile import builtin_profiles, load_profile

GOOD = """
name = "my-board"
kind = "fpga"
[quant]
weight_bit_width = 4
act_bit_width = 4
[fpga]
board = "Pynq-Z1"
part = "xc7z020clg400-1"
clock_mhz = 100.0
target_fps = 1000
[budget]
latency_ms = 5.0
"""


def test_builtin_profiles_and_alias():
    profiles = builtin_profiles()
    assert {"fpga-pynq-z1", "fpga-zcu104"} <= set(profiles)
    p = load_profile("fpga")
    assert p.name == "fpga-pynq-z1" and p.fpga.part == "xc7z020clg400-1" and p.fpga.clock_mhz == 100.0
    z = load_profile("fpga-zcu104")
    assert z.fpga.part == "xczu7ev-ffvc1156-2-e" and z.fpga.clock_mhz == 200.0


def test_unknown_target_lists_known_ones():
    with pytest.raises(ProfileError, match="unknown target 'nosuch'.*fpga-pynq-z1"):
        load_profile("nosuch")


def test_profile_file(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text(GOOD)
    assert load_profile(str(f)).fpga.target_fps == 1000


@pytest.mark.parametrize("old,new,key", [
    ("weight_bit_width = 4", "weight_bit_width = 0", "quant.weight_bit_width"),
    ("act_bit_width = 4", "act_bit_width = 33", "quant.act_bit_width"),
    ("latency_ms = 5.0", "latency_ms = -1.0", "budget.latency_ms"),
    ("clock_mhz = 100.0", "clock_mhz = 100.0\ncolour = 'red'", "fpga.colour"),
])
def test_bad_values_name_key_and_file(tmp_path, old, new, key):
    f = tmp_path / "bad.toml"
    f.write_text(GOOD.replace(old, new))
    with pytest.raises(ProfileError) as exc:
        load_profile(str(f))
    assert key in str(exc.value) and str(f) in str(exc.value)


def test_invalid_toml(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("name = ")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(str(f))


@pytest.mark.parametrize("old,new,key", [
    ('board = "Pynq-Z1"', 'board = "Nope-Board"', "fpga.board"),
    ('part = "xc7z020clg400-1"', 'part = "xc7z999"', "fpga.part"),
])
def test_unknown_board_or_wrong_part_is_refused_before_any_work(tmp_path, old, new, key):
    from pfq_edge.targets.backends.finn.fit import check_fpga_profile

    f = tmp_path / "bad.toml"
    f.write_text(GOOD.replace(old, new))
    with pytest.raises(ProfileError) as exc:
        check_fpga_profile(load_profile(str(f)))
    assert key in str(exc.value) and str(f) in str(exc.value)


def test_a_short_cpu_profile_gets_the_cpu_quant_defaults(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\ndescription = "x"\nkind = "cpu"\nexport_format = "qcdq"\n'
                    '[quant]\nweight_granularity = "per-channel"\n[runtime]\ntvm_target = "llvm"\n[budget]\n'
                    'latency_ms = 50\n')
    q = load_profile(str(path)).quant
    assert (q.weight_bit_width, q.act_bit_width, q.bias, q.weight_granularity) == (8, 8, "int32", "per-channel")
