"""Speed measurements; each script writes JSON under bench/results/ (see bench/README.md)."""
