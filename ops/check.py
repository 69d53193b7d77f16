"""The equivalence harness: Hypothesis checks that a variant computes the same function as its
op's reference, on the op's explicit edge cases and then on generated inputs.

    result = check_variant("rmsnorm", "numba", max_examples=100, seed=0)
    print(result.line)   # PASS rmsnorm=numba (100 examples)  /  FAIL rmsnorm=numba: <error> on <example>

A variant's weight arguments are passed through its prepare step first (for an unfused composite,
the projections go through the given `linear` variant's prepare), exactly as the scheduler would.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .registry import OPS, REFERENCE, describe_args, get_variant, prepare_argument, reference_function


@dataclass
class CheckResult:
    op: str
    variant: str
    passed: bool
    examples: int
    error: str = ""
    example: str = ""

    @property
    def label(self) -> str:
        return f"{self.op}={self.variant}"

    @property
    def line(self) -> str:
        if self.passed:
            return f"PASS {self.label} ({self.examples} examples)"
        return f"FAIL {self.label}: {self.error} on {self.example}"


class _Mismatch(AssertionError):
    pass


def check_variant(op_name: str, variant_name: str, *, max_examples: int = 100, seed: int = 0) -> CheckResult:
    """Check one variant against its op's reference; never raises for a wrong variant, reports it."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    op = OPS[op_name]
    v = get_variant(op_name, variant_name)
    linear_v = get_variant("linear", REFERENCE)  # an unfused composite's projections: the reference's
    fn = reference_function(op_name) if v.fn is None else v.fn  # `composed` over references = the reference
    ref_fn = reference_function(op_name)
    seen = {"n": 0, "last_failure": None}

    def run_one(args: tuple):
        seen["n"] += 1
        given_args = list(args)
        for i in op.weights:
            given_args[i] = prepare_argument(op_name, v, linear_v, given_args[i])
        # a variant with its own (quantised) reference is judged on the same prepared weights it reads
        expected = v.reference(*given_args) if v.reference else ref_fn(*args)
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a wrong variant's overflow warnings are not news
                out = fn(*given_args)
        except Exception as e:  # a variant that crashes fails the check, it does not stop it
            error = f"raised {type(e).__name__}: {e}"
        else:
            error = v.comparison().compare(out, expected, args)
        if error:
            seen["last_failure"] = (error, describe_args(args))
            raise _Mismatch(error)

    for args in (v.examples or op.examples)():  # the explicit edge cases first: catching a bug never depends on luck
        try:
            run_one(args)
        except _Mismatch:
            return CheckResult(op_name, v.name, False, seen["n"], *seen["last_failure"])

    inputs = v.inputs or op.inputs
    if inputs is not None:
        test = given(inputs())(run_one)
        test = settings(max_examples=max_examples, deadline=None, database=None, derandomize=False,
                        suppress_health_check=list(HealthCheck), print_blob=False)(test)
        test = hypothesis_seed(seed)(test)
        try:
            test()
        except _Mismatch:
            # Hypothesis replays the shrunk (smallest) failing example last, so that is what we report.
            return CheckResult(op_name, v.name, False, seen["n"], *seen["last_failure"])
        except Exception as e:  # e.g. an error inside the strategy, or Hypothesis' multiple-failures report
            if seen["last_failure"]:
                return CheckResult(op_name, v.name, False, seen["n"], *seen["last_failure"])
            return CheckResult(op_name, v.name, False, seen["n"], f"{type(e).__name__}: {e}".splitlines()[0], "-")
    return CheckResult(op_name, v.name, True, seen["n"])
