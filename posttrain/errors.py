"""The one exception type that means "the user can fix this": the CLI prints it as a paragraph, not a traceback."""


class UserError(Exception):
    """A mistake in a recipe, a file, an argument or the environment, explained in words the user can act on."""
