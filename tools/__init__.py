"""qtune's measurement tools (see tools/README.md). Run them from the repository root, e.g.
`python -m tools.bench_methods`; tools.harness is the benchmark setting, data and qtune run that the
benchmarks share, tools.workers their worker processes."""
