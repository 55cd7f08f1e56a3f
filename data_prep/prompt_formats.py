"""RL prompt formats: a question and its reference answer -> `prompt`, `answer`, `domain` (+ `thinking`, `images`).

The correctness rewards compare a reply with `answer`, so `answer` must be the final answer alone. Datasets ship it
inside a worked solution: GSM8K's `answer` is a rationale ending in `#### 72`, MATH's `solution` ends in
`\\boxed{...}`. Three formats, told apart by the keys (and by those two markers):

- `gsm8k`: `question` + `answer` holding `####`: the text after the last `####`, without thousands commas (GSM8K's
  own evaluation drops them);
- `math`: `problem` + `solution` with a `\\boxed{}` or `\\fbox{}`: the content of the last one, nested braces
  included; an `answer` column, if given, wins;
- `rl`: a prompt (`prompt`, `question`, `problem`, or `messages` ending on a user turn) and a plain reference
  (`answer`, `ground_truth`, `reference` or `solution`, the first one present; a `solution` with a `\\boxed{}` is
  read as in `math`), as TRL's and open-r1's prompt sets have them; with `images` (or `image`), a vision prompt: the
  files are checked and written as absolute paths, and each `<image>` marker becomes an image part (`records`).
"""

from posttrain.answers import boxed_content, rationale_problem

from .messages import RowError, require_str
from .records import Options, prompt_images, prompt_messages, row_thinking

PROMPT_KEYS = ("prompt", "messages", "question", "problem")
REFERENCE_KEYS = ("answer", "ground_truth", "reference", "solution")


def detect_prompt(row: dict) -> str | None:
    """`gsm8k`, `math` or `rl` for a row with a prompt key and a reference key; None for anything else (a
    `messages` conversation must end on a user turn: one ending on a reply is SFT data)."""
    keys = set(row)
    prompt = next((key for key in PROMPT_KEYS if key in keys), None)
    if prompt is None or not keys & set(REFERENCE_KEYS):
        return None
    if prompt == "messages":
        turns = row["messages"]
        if not (isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "user"):
            return None
    if isinstance(row.get("answer"), str) and "####" in row["answer"]:
        return "gsm8k"
    if isinstance(row.get("solution"), str) and boxed_content(row["solution"]) is not None:
        return "math"
    return "rl"


def _prompt(row: dict) -> list[dict]:
    """The prompt as messages: the first prompt key present, a string (a user turn) or a conversation ending on a
    user turn; the row's `system` column first."""
    return prompt_messages(row, next((key for key in PROMPT_KEYS if key in row), "prompt"))


def _text(value, key: str) -> str:
    """A reference as text: numbers (`"answer": 42`) are written out."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return require_str(value, key, "the reference answer")


def rl_record(row: dict, prompt: list[dict], answer: str, opts: Options) -> dict:
    """The record: `opts.system` before a prompt without a system turn, the row's `domain` (else `opts.domain`: the
    source's name in a build), and `opts.thinking` (else the row's own boolean `thinking`)."""
    if opts.system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": opts.system}, *prompt]
    domain = row.get("domain") or opts.domain
    thinking = opts.thinking if opts.thinking is not None else row_thinking(row, None)
    return {"prompt": prompt, "answer": answer, "thinking": thinking,
            "domain": require_str(domain, "domain", "a domain name such as 'math'")}


def from_rl(row: dict, opts: Options) -> dict:
    """RL prompts: a prompt, a plain reference answer for the verifiers, and a `domain` for per-domain reward scaling;
    `images` (or `image`) as in sft and preference rows, one per `<image>` marker, which becomes an image part.
    A reference that is a worked solution is refused: the `gsm8k` and `math` formats take the answer out of it."""
    prompt, images = prompt_images(row, _prompt(row), opts)
    key = next((k for k in REFERENCE_KEYS if row.get(k) is not None), "answer")
    answer = _text(row.get(key), key)
    if key == "solution" and boxed_content(answer):  # a MATH row in a file most of whose rows are not
        answer = boxed_content(answer)
    if problem := rationale_problem(answer):
        raise RowError(key, problem, "the final answer alone (`format: gsm8k` or `math` takes it out)")
    return {**rl_record(row, prompt, answer, opts), "images": images}


def gsm8k_answer(text: str) -> str:
    """GSM8K's final answer: the text after the last `####`, stripped, without thousands commas ("1,500" -> "1500")."""
    if "####" not in text:
        raise RowError("answer", "has no '####' line", "GSM8K's worked solution ending in '#### <answer>'")
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise RowError("answer", "has nothing after its last '####'", "the final answer after '####'")
    return answer


def from_gsm8k(row: dict, opts: Options) -> dict:
    """GSM8K: `question` (or another prompt key) and `answer`, a rationale ending in `#### <answer>`."""
    prompt = _prompt(row)
    return rl_record(row, prompt, gsm8k_answer(_text(row.get("answer"), "answer")), opts)


def from_math(row: dict, opts: Options) -> dict:
    """MATH / competition math: `problem` (or another prompt key) and `solution` with the answer in its last
    `\\boxed{}`; an `answer` column wins when given."""
    prompt = _prompt(row)
    if row.get("answer") is not None:
        return rl_record(row, prompt, _text(row["answer"], "answer"), opts)
    solution = _text(row.get("solution"), "solution")
    answer = boxed_content(solution)
    if not answer:
        found = "an empty \\boxed{}" if answer == "" else "no closed \\boxed{...} or \\fbox{...}"
        raise RowError("solution", f"has {found}", "a worked solution whose final answer is in \\boxed{...} (or an "
                                                   "`answer` column)")
    return rl_record(row, prompt, answer, opts)
