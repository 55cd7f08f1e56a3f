"""One rich console for the whole CLI, so progress, rules and errors share one style (and go to stderr when piped)."""

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
