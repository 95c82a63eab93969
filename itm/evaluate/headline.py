"""The figures a stage prints when it ends: per protocol, R@1/5/10 both ways and rSum with its interval."""

from __future__ import annotations

from collections.abc import Mapping

KS = (1, 5, 10)  # the recalls that sum to rSum (itm.evaluate.metrics.RSUM_KS)


def headline(label: str, metrics: Mapping[str, float]) -> list[str]:
    """One line per protocol of `metrics` (a metrics file's content), e.g.
    `evaluate@vsepp-0 test: i2t R@1/5/10 20.1/45.3/60.2, t2i R@1/5/10 15.0/38.9/52.1, rSum 231.6 [224.0, 239.1]`."""
    lines = []
    for key in metrics:
        if not key.endswith("/rsum"):
            continue
        protocol = key.removesuffix("/rsum")
        recalls = ", ".join(
            f"{side} R@1/5/10 " + "/".join(f"{metrics[f'{protocol}/{side}_r{k}']:.1f}" for k in KS)
            for side in ("i2t", "t2i")
        )
        interval = ""
        if f"{key}_ci_low" in metrics:
            interval = f" [{metrics[f'{key}_ci_low']:.1f}, {metrics[f'{key}_ci_high']:.1f}]"
        lines.append(f"{label} {protocol}: {recalls}, rSum {metrics[key]:.1f}{interval}")
    return lines
