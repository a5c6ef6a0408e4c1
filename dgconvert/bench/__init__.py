"""Benchmark harness behind ``dgconvert bench``: the gated runtime against the full model
(and the PyTorch eager and naive masked gated models), with ideal times and efficiency.

```python
from dgconvert.bench import BenchConfig, run_benchmark
rep = run_benchmark("model.dg", images, labels, config=BenchConfig(batch_sizes=[1, 64]))
print(rep.markdown()); rep.plot("bench.png"); rep.to_dict()  # JSON-able
```

See :mod:`dgconvert.bench.stats` for how ideal and efficiency are defined,
:mod:`dgconvert.bench.harness` for how timing is done, and
:mod:`dgconvert.bench.memory` for what the peak-memory figures measure.
"""

from __future__ import annotations

from dgconvert.bench.errors import BenchError
from dgconvert.bench.harness import BenchConfig, measure, run_benchmark
from dgconvert.bench.machine import describe_machine, machine_info
from dgconvert.bench.measurements import Measurements
from dgconvert.bench.operating import NO_EXIT, calibrated_points, no_exit_point, point_name
from dgconvert.bench.report import (
    BenchReport,
    SystemResult,
    build_results,
    plot_results,
    render_paper_table,
    render_table,
)
from dgconvert.bench.stats import (
    Spread,
    cost_share_flops,
    cost_share_time,
    efficiency,
    ideal_time,
    summarize,
)

__all__ = [
    "NO_EXIT",
    "BenchConfig",
    "BenchError",
    "BenchReport",
    "Measurements",
    "Spread",
    "SystemResult",
    "build_results",
    "calibrated_points",
    "cost_share_flops",
    "cost_share_time",
    "describe_machine",
    "efficiency",
    "ideal_time",
    "machine_info",
    "measure",
    "no_exit_point",
    "plot_results",
    "point_name",
    "render_paper_table",
    "render_table",
    "run_benchmark",
    "summarize",
]
