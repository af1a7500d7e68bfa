"""One module per scenario, each with ``run(repeats: int) -> Section``."""
