"""What a stage reads for its rewards besides the replies: the prompt columns they are given, and the source files of
rewards of your own (an edited one trains the stage again, as edited data does)."""

import importlib
import inspect

from .errors import UserError
from .rewards import REWARD_COLUMNS, REWARDS, reward_function

# what GRPO passes a reward besides the prompts' columns: a parameter of these names is not a column
GRPO_KEYWORDS = frozenset({"completions", "prompts", "completion_ids", "trainer_state", "log_extra", "log_metric",
                           "environments"})
# columns GRPO leaves out of a reward's arguments: it passes them as `prompts` and `completions`
NOT_PASSED = ("prompt", "completion")


def column_parameters(name: str) -> dict[str, bool]:
    """The prompt columns a reward of your own names as parameters, as TRL's rewards do (`fn(completions, solution,
    **kwargs)` reads `solution`), each with whether it is required (no default value); none for a built-in one."""
    if name in REWARDS:
        return {}
    try:
        parameters = inspect.signature(reward_function(name)).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return {}
    return {p.name: p.default is p.empty for p in parameters
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in GRPO_KEYWORDS}


def reward_columns(names) -> set[str]:
    """The prompt columns the stage keeps for its rewards: `REWARD_COLUMNS` and those its own rewards name."""
    return {*REWARD_COLUMNS, *(column for name in names or () for column in column_parameters(name))}


def check_own_reward_columns(names, columns, where: str) -> None:
    """A UserError naming a reward of your own whose required parameter is not a column of the prompts: GRPO (and
    the pair sampler) would call it without that argument, a TypeError from inside the trainer a step in."""
    for name in names or ():
        required = [column for column, needed in column_parameters(name).items() if needed]
        if unpassed := [column for column in required if column in NOT_PASSED]:
            raise UserError(f"{where}: reward '{name}' takes {', '.join(unpassed)} as a parameter, which GRPO never "
                            "passes (it gives them as `prompts` and `completions`); rename it")
        missing = [column for column in required if column not in columns]
        if missing:
            raise UserError(f"{where}: reward '{name}' takes the column(s) {', '.join(missing)} as parameters, which "
                            f"the prompts do not have (columns: {', '.join(columns)}); add them, or give the "
                            "parameters a default value")


def custom_reward_files(names) -> dict[str, str]:
    """The source file of each reward of your own among `names` (by name), for a stage's inputs: an edited reward
    function trains the stage again, as edited data does."""
    files = {}
    for name in names or ():
        if name not in REWARDS:
            func = reward_function(name)
            if not inspect.isroutine(func):  # a callable instance or a partial: the file of the module it is in
                func = importlib.import_module(name.rpartition(".")[0])
            source = inspect.getsourcefile(func)
            if source:
                files[name] = source
    return files
