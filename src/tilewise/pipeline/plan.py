"""``tilewise run --plan``: what a job will compute and the memory each actor needs."""
