"""The op registry, the scheduler and the equivalence harness."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ops
import tinyllm
from ops.check import check_variant
from ops.registry import VARIANTS, default_variant, variant
from tinyllm import schedule
from tinyllm.plugins import load_plugins
from tinyllm.schedule import ScheduleError

PLANTED = Path(__file__).parent / "plugins" / "planted_bugs.py"
PLANTED_Q8_0 = Path(__file__).parent / "plugins" / "planted_q8_0_bugs.py"
PLANTED_VARIANTS = ["rmsnorm=planted_no_eps", "rmsnorm=planted_wrong_axis", "attention=planted_no_causal_mask",
                    "rope=planted_adjacent_pairs", "softmax=planted_no_max_subtraction",
                    "linear=planted_drops_last_column"]


# -- every registered variant computes its op: a new variant is tested without writing a test -----
@pytest.mark.parametrize("op_name, var_name", [(o, v) for o in VARIANTS for v in VARIANTS[o]
                                               if v != default_variant(o)], ids=lambda x: x)
def test_every_variant_matches_its_reference(op_name, var_name):
    if not VARIANTS[op_name][var_name].available:
        pytest.skip(f"{op_name}={var_name} is not available on this machine")
    result = check_variant(op_name, var_name)
    assert result.passed, result.line


# -- the harness can fail ---------------------------------------------------------------------
def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tinyllm", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_check_catches_every_planted_bug_with_the_default_budget_and_seed():
    r = run_cli("check", ",".join(PLANTED_VARIANTS), "--plugin", PLANTED)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert [line.split(":")[0] for line in lines] == [f"FAIL {v}" for v in PLANTED_VARIANTS]
    assert all(" on (" in line for line in lines)  # each names the failing example
    assert "0 passed, 6 failed" in r.stdout


@pytest.fixture
def planted():
    """The planted variants registered in this process, removed again afterwards."""
    load_plugins([str(PLANTED)])
    yield
    for label in PLANTED_VARIANTS:
        op_name, name = label.split("=")
        VARIANTS[op_name].pop(name, None)
    for name in [m for m in sys.modules if m.startswith("tinyllm_plugin_planted_bugs")]:
        del sys.modules[name]


@pytest.mark.parametrize("label", PLANTED_VARIANTS)
def test_generated_inputs_alone_catch_each_planted_bug(planted, monkeypatch, label):
    # Without the explicit edge cases, the strategies still find every planted bug (default seed).
    op_name, name = label.split("=")
    monkeypatch.setattr(ops.OPS[op_name], "examples", lambda: [])
    result = check_variant(op_name, name)
    assert not result.passed and result.example


@pytest.mark.parametrize("op_name", ["qkv_rope", "swiglu_mlp", "norm_head"])
def test_the_q8_0_flip_allowance_does_not_hide_unrounded_activations(op_name):
    # The q8_0 composites may differ from their quantised reference by roundings that flip to the
    # neighbouring level; a kernel that does not round at all must still fail (qkv_rope's allowance
    # once let it pass: four times the largest quantum·|w| of any row, whatever the rounding did).
    load_plugins([str(PLANTED_Q8_0)])
    try:
        result = check_variant(op_name, "planted_unrounded")
    finally:
        for name in ("qkv_rope", "swiglu_mlp", "norm_head"):
            VARIANTS[name].pop("planted_unrounded")
        for name in [m for m in sys.modules if m.startswith("tinyllm_plugin_planted_q8_0_bugs")]:
            del sys.modules[name]
    assert not result.passed, result.line


def test_check_is_reproducible_and_writes_json(tmp_path):
    out = tmp_path / "check.json"
    a = run_cli("check", "rope=planted_adjacent_pairs", "--plugin", PLANTED, "--seed", "5", "--examples", "20")
    b = run_cli("check", "rope=planted_adjacent_pairs", "--plugin", PLANTED, "--seed", "5", "--examples", "20",
                "--json", out)
    assert a.stdout == b.stdout and a.returncode == b.returncode == 1
    data = json.loads(out.read_text())
    assert data["results"][0]["op"] == "rope" and data["results"][0]["passed"] is False
    assert data["seed"] == 5


# -- the spec grammar ---------------------------------------------------------------------------
@pytest.fixture
def extra_variants():
    """A few harmless variants to schedule: an exact copy of rmsnorm, an unavailable one, and an
    'int8'-format linear (fp32 arithmetic, only its declared format differs)."""
    made = []

    def register(op_name, name, fn, **kw):
        variant(op_name, name, **kw)(fn)
        made.append((op_name, name))

    register("rmsnorm", "copy", ops.norm.rmsnorm)
    register("rmsnorm", "gpu", ops.norm.rmsnorm, available=False, unavailable_reason="no GPU here")
    register("linear", "fake_int8", ops.linear.linear, weight_format="int8")
    register("qkv_rope", "fake_fused", lambda x, w, cos, sin, eps: None, weight_format="fp32")
    schedule.register_preset("copies", {"rmsnorm": "copy"})
    yield
    for op_name, name in made:
        VARIANTS[op_name].pop(name)
    schedule.PRESETS.pop("copies")
    if "copies" in schedule.FASTEST_EXACT:
        schedule.FASTEST_EXACT.remove("copies")


def test_spec_items_apply_left_to_right_on_top_of_reference(extra_variants):
    s = schedule.parse("copies,rmsnorm=reference")
    assert s.spec == "copies,rmsnorm=reference" and s.choice["rmsnorm"] == "reference"
    assert schedule.parse("rmsnorm=reference,copies").choice["rmsnorm"] == "copy"
    assert schedule.parse({"rmsnorm": "copy"}).choice["rmsnorm"] == "copy"
    ref = schedule.parse("reference").choice
    assert all(v in ("reference", "composed") for v in ref.values()) and set(ref) == set(ops.OPS)


@pytest.mark.parametrize("spec, message", [
    ("turbo", "unknown preset 'turbo'; presets are: reference"),
    ("rmsnorm=nope", "unknown variant rmsnorm=nope; rmsnorm has: reference"),
    ("norm=copy", "unknown op 'norm'"),
    ("reference,,copies", "empty item"),
    ("rmsnorm=gpu", "rmsnorm=gpu is not available on this machine (no GPU here); available for rmsnorm:"),
    ("linear=fake_int8,qkv_rope=fake_fused",
     "qkv_rope=fake_fused reads fp32 weights but linear=fake_int8 stores int8: choose qkv_rope=composed"),
])
def test_bad_specs_are_one_line_errors_naming_the_valid_choices(extra_variants, spec, message):
    with pytest.raises(ScheduleError) as err:
        schedule.parse(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_default_is_the_fastest_exact_preset_available(extra_variants, monkeypatch):
    # a preset that cannot run here is passed over for the next one in order of speed
    monkeypatch.setitem(schedule.PRESETS, "gpu_only", {"rmsnorm": "gpu"})
    monkeypatch.setattr(schedule, "FASTEST_EXACT", ["gpu_only", "copies", "reference"])
    assert schedule.default_spec() == "copies"
    monkeypatch.setattr(schedule, "FASTEST_EXACT", ["gpu_only", "reference"])
    assert schedule.default_spec() == "reference"


# -- swapping at run time -------------------------------------------------------------------------
@pytest.fixture
def counting_variants():
    calls = {"rmsnorm": 0, "prepare": 0}

    def counting_rmsnorm(x, weight, eps):
        calls["rmsnorm"] += 1
        return ops.norm.rmsnorm(x, weight, eps)

    def prepare_copy(w):
        calls["prepare"] += 1
        return np.array(w)  # a prepared copy; the variant below reads it like the reference

    variant("rmsnorm", "counting")(counting_rmsnorm)
    variant("linear", "prepared_copy", prepare=prepare_copy)(ops.linear.linear)
    yield calls
    VARIANTS["rmsnorm"].pop("counting")
    VARIANTS["linear"].pop("prepared_copy")


def test_swap_changes_which_code_runs_not_the_output(tiny_model_dir, counting_variants):
    calls = counting_variants
    model = tinyllm.load(tiny_model_dir, ops="reference")
    ids = model.tokenizer.encode("swap me")
    before = model.logits(ids)
    text = model.generate("swap me", chat=False, max_new_tokens=6)

    model.swap("rmsnorm", "counting")
    after = model.logits(ids)
    n_layers = model.config.n_layers
    assert calls["rmsnorm"] == 2 * n_layers + 1  # qkv_rope and add_rmsnorm per layer, then norm_head
    np.testing.assert_array_equal(after, before)
    assert model.generate("swap me", chat=False, max_new_tokens=6) == text
    assert calls["rmsnorm"] > 2 * n_layers + 1  # generation after the swap runs the new variant

    model.swap("rmsnorm", "reference")
    n = calls["rmsnorm"]
    model.logits(ids)
    assert calls["rmsnorm"] == n

    # a linear variant with a prepare step: every projection is prepared once, on swap
    model.swap("linear", "prepared_copy")
    assert calls["prepare"] == n_layers * (3 + 1 + 3) + 1  # q,k,v; o; gate,up,down per layer; LM head
    np.testing.assert_array_equal(model.logits(ids), before)
    model.swap("attention", "reference")  # nothing that reads weights changed: nothing is prepared again
    assert calls["prepare"] == n_layers * 7 + 1
    assert model.schedule.spec == "reference,rmsnorm=counting,rmsnorm=reference,linear=prepared_copy," \
                                  "attention=reference"


def test_failed_swaps_keep_the_model_working(tiny_model_dir):
    model = tinyllm.load(tiny_model_dir, ops="reference")
    before = model.logits([1, 2, 3])
    with pytest.raises(tinyllm.TinyLLMError, match="unknown variant"):
        model.swap("linear", "warp")

    calls = {"n": 0}

    def fails_on_the_third(w):  # a plugin's prepare step that breaks half-way through the weights
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of coffee")
        return w

    variant("linear", "flaky", prepare=fails_on_the_third)(ops.linear.linear)
    try:
        with pytest.raises(tinyllm.TinyLLMError, match=r"preparing weights for .*linear=flaky.* failed: RuntimeError: out of coffee"):
            model.swap("linear", "flaky")
    finally:
        VARIANTS["linear"].pop("flaky")
    assert model.schedule.spec == "reference"
    np.testing.assert_array_equal(model.logits([1, 2, 3]), before)  # nothing half-installed


# -- plugins and the CLI ------------------------------------------------------------------------
def test_plugins_from_the_environment_and_ops_table(tmp_path):
    import os

    env = {**os.environ, "TINYLLM_PLUGINS": str(PLANTED)}
    r = run_cli("ops", "--ops", "rope=planted_adjacent_pairs", env=env)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("rope "))
    assert "*planted_adjacent_pairs" in row and " reference" in row
    bad = run_cli("ops", "--plugin", tmp_path / "missing.py")
    assert bad.returncode == 2 and bad.stderr.startswith("error: plugin file") and len(bad.stderr.splitlines()) == 1
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    bad = run_cli("ops", "--plugin", tmp_path / "broken.py")
    assert bad.returncode == 2 and "RuntimeError: boom" in bad.stderr


def test_a_variant_with_its_own_quantised_reference_is_judged_against_it():
    # A linear whose prepare rounds weights to multiples of 1/8: far from the fp32 reference, but exactly
    # what its own reference (the float op on the prepared weights) computes.
    from ops.registry import EXACT

    def round_weights(w):
        return np.round(w * 8) / 8

    variant("linear", "eighths", prepare=round_weights, reference=ops.linear.linear, rule=EXACT)(ops.linear.linear)
    variant("linear", "eighths_unjudged", prepare=round_weights)(ops.linear.linear)
    try:
        assert check_variant("linear", "eighths").passed
        assert not check_variant("linear", "eighths_unjudged").passed  # against fp32, the rounding shows
    finally:
        VARIANTS["linear"].pop("eighths")
        VARIANTS["linear"].pop("eighths_unjudged")


def test_an_op_declared_with_its_strategy_or_given_one_afterwards():
    # The family files attach strategies after the reference (`rmsnorm.strategy(...)`); a plugin may
    # pass them to `@op` directly. Either way the harness finds them, and a second one is refused.
    from ops.registry import OPS, RegistryError, op

    def inputs():
        from hypothesis import strategies as st

        return st.tuples(st.integers(-5, 5))

    @op("plugin_square", rule=ops.registry.EXACT, inputs=inputs, examples=lambda: [(3,)])
    def square(x):
        return x * x

    @op("later_square", rule=ops.registry.EXACT)
    def later(x):
        return x * x

    try:
        assert later.strategy(inputs, examples=lambda: [(2,)]) is later
        variant("plugin_square", "same")(lambda x: x ** 2)
        variant("later_square", "same")(lambda x: x ** 2)
        assert check_variant("plugin_square", "same", max_examples=5).passed
        assert check_variant("later_square", "same", max_examples=5).passed
        with pytest.raises(RegistryError):
            square.strategy(inputs)
    finally:
        for name in ("plugin_square", "later_square"):
            OPS.pop(name)
            VARIANTS.pop(name)


def test_the_op_table_names_no_op_for_its_thread_policy():
    # Which ops read the projections comes from their declarations (`projections=`), the LM head
    # (own_format) aside; the forward pass's thread policy is the table's (ops/threads.py).
    from ops.registry import OPS, OpTable

    choice = {name: default_variant(name) for name in OPS}
    table = OpTable(choice)
    assert not table.quantized_projections
    with table.forward_pass(128):
        pass
    head = next(v for v in VARIANTS["norm_head"].values() if v.weight_format not in ("fp32", "any"))
    assert not OpTable({**choice, "norm_head": head.name}).quantized_projections  # a quantised head alone
    linear = next(v for v in VARIANTS["linear"].values() if v.weight_format not in ("fp32", "any"))
    assert OpTable({**choice, "linear": linear.name}).quantized_projections  # composed composites read it
