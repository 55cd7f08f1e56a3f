"""The Hugging Face Hub side of `posttrain export --push-to-hub`: the token (never printed), the repository and branch
made where missing, the folder uploaded; each failure as an error that says what to do, none that hangs offline."""

import contextlib
import re
import shlex
from pathlib import Path

from .errors import UserError


def hub_token(repo_id: str) -> str:
    """The token `huggingface_hub` would use (HF_TOKEN, then the saved login); every reason not to push is an error."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .models import is_offline

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"--push-to-hub {repo_id}: not a valid repository id ({exc})") from None
    if "/" not in repo_id:
        raise UserError(f"--push-to-hub {repo_id}: give the full id, e.g. your-name/{repo_id}")
    if is_offline():
        raise UserError(f"--push-to-hub {repo_id} needs the network, but HF_HUB_OFFLINE=1 is set. Unset "
                        "HF_HUB_OFFLINE, or export without --push-to-hub now and again with it where the Hub is "
                        "reachable (the model card's code then loads the repository, not a local folder).")
    try:
        token = get_token()
    except Exception as exc:  # an OIDC token exchange (HF_OIDC_RESOURCE) that failed; never echo the token itself
        raise UserError(f"--push-to-hub {repo_id}: could not get a Hugging Face token: {type(exc).__name__}") from None
    if not token:
        raise UserError(f"--push-to-hub {repo_id}: no Hugging Face token found. Set HF_TOKEN or run `hf auth login` "
                        "(a token with write access).")
    return token


def create_repo(repo_id: str, token: str, private: bool, revision: str | None) -> None:
    """The Hub repository (and branch) to push to, created if missing, as `Trainer(push_to_hub=True)` does before it
    trains: a Hub that cannot be reached or a token without write access is an error before anything is exported."""
    from huggingface_hub import HfApi

    from .models.load import HUB_TIMEOUT_S, http_timeouts

    api = HfApi(token=token)
    try:  # huggingface_hub's own requests wait without limit (timeout=None): one bounded request first
        api.repo_info(repo_id, repo_type="model", timeout=HUB_TIMEOUT_S)
    except http_timeouts():
        raise UserError(f"--push-to-hub {repo_id}: the Hugging Face Hub did not answer within {HUB_TIMEOUT_S} s; "
                        "check the network (nothing was exported)") from None
    except Exception:  # the Hub answered (a missing repository among others): create_repo below says the rest
        pass
    with _hub_errors(f"--push-to-hub {repo_id}: could not create or open the repository on the Hub", token,
                     "nothing was exported"):
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)


# The model files an earlier export to the same repository and branch may have left there: a merged export's weights
# beside an adapter's (or the other way round) would be what a loader finds. The upload deletes them in its commit;
# the files it uploads are kept (huggingface_hub skips deleting a path it adds).
EARLIER_EXPORT_FILES = ["*.safetensors", "*.safetensors.index.json", "*.bin", "config.json", "generation_config.json",
                        "adapter_config.json"]


def push_folder(folder: Path, repo_id: str, token: str, revision: str | None, message: str) -> str:
    """upload_folder into the repository `create_repo` made, in place of the model files of an earlier export there;
    errors become one UserError with the token scrubbed out."""
    # to the branch the card's snippet loads: without --revision, `hf upload` would write to main
    again = shlex.join(["hf", "upload", repo_id, str(folder), *(["--revision", revision] if revision else [])])
    with _hub_errors(f"uploading {folder} to {repo_id} failed", token,
                     f"the export is complete there; upload it later with: {again}"):
        from huggingface_hub import HfApi

        commit = HfApi(token=token).upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                                  revision=revision, commit_message=message,
                                                  delete_patterns=EARLIER_EXPORT_FILES)
    return commit.commit_url


@contextlib.contextmanager
def _hub_errors(what: str, token: str, then: str):
    try:
        yield
    except Exception as exc:  # HTTP, auth and validation errors alike: the user needs the message, not the trace
        raise UserError(f"{what}: {str(exc).replace(token, '***')} ({then})") from None


# the Hub's license identifiers (apache-2.0, mit, cc-by-nc-4.0, llama3.1, openrail++, other): lowercase, no spaces
HUB_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]*")


def check_license(license: str) -> None:
    """A model card's `license:` the Hub takes; it checks it at the upload, after the export's minutes of work. The
    `UserError` offers the identifier a name most likely meant ('Apache 2.0' -> 'apache-2.0', 'MIT' -> 'mit')."""
    if not HUB_LICENSE.fullmatch(license):
        meant = re.sub(r"[^a-z0-9.+]+", "-", license.strip().lower()).strip("-") or "other"
        raise UserError(f"--license {license!r}: the Hub takes a license identifier, lowercase, such as '{meant}' "
                        "(https://huggingface.co/docs/hub/repositories-licenses; 'other' for a license of its own); "
                        "it refuses a card with any other value at the upload")
