"""The deploy pipeline and CLI: export, predict, validate, bench."""
