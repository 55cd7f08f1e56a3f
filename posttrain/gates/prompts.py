"""RL prompt gates: a `prompt` column of conversations that end on the turn the model answers, no per-row tools, and
the reference each reward reads."""

import json

from ..errors import UserError, row_name
from .pairs import prompt_end


def check_prompt_rows(dataset, name: str) -> None:
    """RL prompts are in a `prompt` column (GRPOTrainer reads no other), there are some, and each conversation ends
    on the turn the model answers (`prompt_end`)."""
    if "prompt" not in dataset.column_names:
        raise UserError(f"pre-flight: {name}: UPO prompts need a `prompt` column (text, or a list of {{role, content}} "
                        f"messages) next to what the rewards read (e.g. `answer`); it has: "
                        f"{', '.join(dataset.column_names) or 'no columns'}")
    check_no_row_tools(dataset, name)
    if len(dataset) == 0:
        raise UserError(f"pre-flight: {name}: no prompts to train on")
    for index, prompt in enumerate(dataset["prompt"]):
        if isinstance(prompt, list) and (problem := prompt_end(prompt)):
            raise UserError(f"pre-flight: {name} {row_name(index)}: {problem}")


def check_no_row_tools(dataset, name: str) -> None:
    """No row has `tools`: UPO renders its RL prompts, and its offline pairs' prompts as it renders those, without a
    per-row `tools` column, as TRL's GRPO does; the schemas belong in the prompt (README: Tool calling)."""
    tools = dataset["tools"] if "tools" in dataset.column_names else []
    index = next((i for i, value in enumerate(tools) if names_tools(value)), None)
    if index is not None:
        raise UserError(f"pre-flight: {name} {row_name(index)}: its `tools` would be left out: TRL's GRPO renders every "
                        "prompt without a per-row `tools` column, so the model would be asked to call tools it is "
                        "never shown. Put the schemas in each prompt's system turn, and drop the column")


def names_tools(cell) -> bool:
    """Whether a `tools` cell holds any schema: an empty cell or "" (which `check_tools_column` refuses for SFT and
    DPO as not JSON) holds none, and so does empty JSON text ("[]", "[ ]", "null", as that gate reads it); text that
    is not JSON counts as tools (meant as some)."""
    if isinstance(cell, str):
        try:
            cell = json.loads(cell) if cell.strip() else None
        except ValueError:
            return True
    return bool(cell)


def check_reward_references(dataset, rewards: dict | None, name: str, allow_skip: bool = False):
    """Every reference column a reward reads (`rewards.REQUIRED_COLUMNS`) exists and is filled in every prompt row: a
    prompt whose `answer` is null or blank has nothing to be right against, so the correctness rewards return None
    (not applicable) for all its completions, and it spends generations that train on the other rewards alone, or on
    nothing. A missing column is always an error; empty rows are an error naming the row, or a counted skip when
    allowed. A reference that is a worked solution (`answers.rationale_problem`: GSM8K's `#### 72`, a long text
    around a `\\boxed{}`) is always an error: it is the whole column, not a row, that needs the answer taken out."""
    from ..answers import rationale_problem
    from ..reward_inputs import check_own_reward_columns
    from ..rewards import REQUIRED_COLUMNS

    check_own_reward_columns(rewards, dataset.column_names, f"pre-flight: {name}")
    needed = {}
    for reward in rewards or {}:
        if reward in REQUIRED_COLUMNS:
            needed.setdefault(REQUIRED_COLUMNS[reward], []).append(reward)
    bad = set()
    for column, users in needed.items():
        if column not in dataset.column_names:
            raise UserError(f"pre-flight: {name}: reward(s) {', '.join(users)} need a '{column}' column; the rows "
                            f"have: {', '.join(dataset.column_names)}")
        for index, value in enumerate(dataset[column]):
            if value is not None and (problem := rationale_problem(str(value))):
                raise UserError(f"pre-flight: {name} {row_name(index)}: '{column}' {problem}, so reward "
                                f"'{users[0]}' would compare each reply with the whole solution; expected the final "
                                "answer alone. `posttrain data build_prompt_set` takes it out (GSM8K's `question`/"
                                "`answer`, MATH's `problem`/`solution`; data_prep/README.md)")
            if value is None or not str(value).strip():
                if not allow_skip:
                    raise UserError(f"pre-flight: {name} {row_name(index)}: '{column}' is empty, so reward "
                                    f"'{users[0]}' could not score any completion of this prompt (no reward, no "
                                    "gradient); fill it or drop the row (set skip_bad_rows: true to skip such rows)")
                bad.add(index)
    if bad:
        dataset = dataset.select(sorted(set(range(len(dataset))) - bad))
    return dataset, len(bad)
