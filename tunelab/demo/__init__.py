"""The built-in demo world and the `tunelab demo` pipeline."""


def run_demo(output: str = "runs/demo", quick: bool = False, overwrite: bool = False, seed: int = 0) -> dict:
    """Run the demo pipeline (see tunelab.demo.pipeline)."""
    from tunelab.demo.pipeline import run_demo as _run

    return _run(output, quick=quick, overwrite=overwrite, seed=seed)
