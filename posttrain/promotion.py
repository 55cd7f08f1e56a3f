"""Promote gates: a stage that is measurably worse than the step before it stops the chain and is not exported.

A recipe's `gate:` (in `shared:` for every stage, or in one stage's section) is a `GateArguments`. After a stage has
been evaluated, the pipeline compares it with the last evaluated step before it on the same held-out prompts:

- accuracy: paired, prompt by prompt (exact McNemar, `stats.compare`): a drop stops the chain only when it is
  significant and larger than `max_drop`, so luck on a few prompts does not block a run;
- any other metric in `DIRECTIONS`: a plain threshold, worse by more than `max_drop` in the metric's units.

The verdict is written to the stage's metrics.json (`promotion`) and run.json; the report and `posttrain export` read
it from there.
"""

from .configs import GateArguments
from .errors import UserError
from .stats import format_p, paired_evals
from .typecheck import suggest

# metric -> +1 when higher is better, -1 when lower is better
DIRECTIONS = {"accuracy": 1, "format": 1, "stop_rate": 1, "heldout_loss": -1}
# metrics are fractions k/n: 0.55 - 0.50 is 0.05000000000000004, and a drop of exactly `max_drop` is tolerated
ROUNDING = 1e-9


class GateStopped(UserError):
    """A stage's promote gate stopped the run: the run ends "stopped" (not "failed"), and an ablation records the
    variant as a result."""


def check_gate_spec(gate: GateArguments, where: str) -> GateArguments:
    if gate.metric not in DIRECTIONS:
        raise UserError(f"{where}.metric: '{gate.metric}' is not a metric a gate can compare"
                        f"{suggest(gate.metric, DIRECTIONS)}; expected one of {', '.join(DIRECTIONS)}")
    if gate.max_drop < 0:
        raise UserError(f"{where}.max_drop: {gate.max_drop} is negative; expected the tolerated worsening (>= 0)")
    return gate


def promotion(gate: GateArguments | None, previous: str, previous_eval: dict | None, current_eval: dict | None) -> dict:
    """What the pipeline records for a stage: its paired accuracy comparison with step `previous`, and the gate's
    verdict (`passed`, `enforced`, `reason`) when it has a gate."""
    comparison = paired_evals(previous_eval, current_eval)
    out = {"against": previous, "comparison": comparison.to_dict() if comparison else None, "gate": None}
    if gate is not None:
        out["gate"] = verdict(gate, previous, previous_eval or {}, current_eval or {}, comparison)
    return out


def verdict(gate: GateArguments, previous: str, before: dict, after: dict, comparison) -> dict:
    """The gate's decision with the numbers it rests on and one sentence a person can act on."""
    metric, direction = gate.metric, DIRECTIONS[gate.metric]
    old, new = before.get(metric), after.get(metric)
    out = {"metric": metric, "previous": previous, "previous_value": old, "value": new, "max_drop": gate.max_drop,
           "enforced": gate.must_not_drop, "p_value": None}
    if old is None:
        return {**out, "passed": True, "reason": f"{previous} has no {metric} to compare with; nothing to check"}
    if new is None:
        return {**out, "passed": False, "reason": f"{metric} was not measured (missing or NaN), so the stage cannot "
                                                  f"be shown to be no worse than {previous}"}
    drop = direction * (old - new)  # > 0: worse
    worse = drop > gate.max_drop + ROUNDING
    if metric == "accuracy":
        if comparison is None:
            return {**out, "passed": True, "reason": f"no per-prompt verdicts on the same prompts as {previous}; "
                                                     "accuracy not tested"}
        out["p_value"] = comparison.p_value
        test = f"McNemar p={format_p(comparison.p_value)}, {comparison.only_a} prompts lost, {comparison.only_b} gained"
        why = ("" if drop <= 0 or (worse and comparison.significant) else
               "; not significantly worse" if not comparison.significant else f"; within max_drop {gate.max_drop:g}")
        worse = worse and comparison.significant
        reason = f"accuracy {100 * new:.1f}% vs {100 * old:.1f}% after {previous} ({test}){why}"
    else:
        reason = (f"{metric} {new:.4g} vs {old:.4g} after {previous}: "
                  f"{'worse' if drop > 0 else 'not worse'} by {abs(drop):.4g} (max_drop {gate.max_drop:g})")
    return {**out, "passed": not worse, "reason": reason}


def blocks_chain(record: dict | None) -> bool:
    """True when a stage's `promotion` record says its gate failed and is enforced."""
    gate = (record or {}).get("gate") or {}
    return bool(gate) and not gate.get("passed", True) and gate.get("enforced", True)
