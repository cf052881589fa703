"""The driver of diffrep: the CLI, datasets and manifest, Dask orchestration, results and reports."""
