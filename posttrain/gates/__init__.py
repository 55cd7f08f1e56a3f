"""Pre-flight gates: checks that stop a run before it trains on something silently broken.

Each failure here is one users of TRL-based tools discover after hours of training: an assistant mask that is empty
(the loss trains on nothing, or on the prompt), an end-of-turn token that never gets a label (the model never
stops), a chat template without `{% generation %}` markers while assistant-only loss was asked for, chosen == rejected
pairs. The checks use the trainer's own tokenized data and collator where they can, so they test what will train.

- `templates.py`: generation markers, rendering every row, the prompt/reply boundary, collated end-of-turn labels;
- `rows.py`: SFT columns and conversations, the `tools` column and tool calls;
- `reasoning.py`: reasoning a template drops, thinking modes, non-thinking rows that reason;
- `tokens.py`: control tokens written as text in a turn;
- `lengths.py`: replies `max_length` cuts before their end-of-turn token;
- `pairs.py`: preference pairs; `prompts.py`: RL prompts and their reward references;
- `images.py`: images against placeholders, image tokens against `max_length`, processor against model.
"""

from .images import check_image_slots, check_image_tokens, check_processor_matches_model
from .lengths import count_cut_pairs, reply_cut, warn_cut_replies
from .pairs import check_preference_pairs, kept_rows, prompt_end
from .prompts import check_no_row_tools, check_prompt_rows, check_reward_references
from .reasoning import (
    check_non_thinking_replies,
    check_pair_reasoning,
    check_reasoning,
    check_row_reasoning,
    check_thinking_modes,
    non_thinking_reasoning,
    reply_reasoning,
)
from .rows import SFT_FORMATS, check_conversations, check_sft_columns, check_tool_calls, check_tools_column
from .templates import (
    check_collated_labels,
    check_prompt_boundary,
    check_template_markers,
    check_template_renders,
    end_of_turn_ids,
    training_templates,
)
from .tokens import (
    CONVERSATION_COLUMNS,
    MEANT_AS_TOKENS,
    check_special_token_text,
    check_turn_text,
    control_tokens,
    image_tokens,
)

__all__ = ["check_collated_labels", "check_conversations", "check_image_slots", "check_image_tokens",
           "check_no_row_tools", "check_non_thinking_replies", "check_pair_reasoning", "check_preference_pairs",
           "check_processor_matches_model", "check_prompt_boundary", "check_prompt_rows", "check_reasoning",
           "check_reward_references", "check_row_reasoning", "check_sft_columns", "check_special_token_text",
           "check_template_markers", "check_template_renders", "check_thinking_modes", "check_tool_calls",
           "check_tools_column", "check_turn_text", "control_tokens", "CONVERSATION_COLUMNS", "count_cut_pairs",
           "end_of_turn_ids", "image_tokens", "kept_rows", "MEANT_AS_TOKENS", "non_thinking_reasoning", "prompt_end",
           "reply_cut", "reply_reasoning", "SFT_FORMATS", "training_templates", "warn_cut_replies"]
