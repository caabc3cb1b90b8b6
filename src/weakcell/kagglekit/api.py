"""``make download`` and ``make submit``: the only code that talks to Kaggle.

The ``kaggle`` package is imported here, inside the commands, never when weakcell is imported: importing
it authenticates (and prints a page of help when there are no credentials). Credentials are looked up
first without it, so that their absence, like a missing network or a refusal, ends in one short message
(``KaggleUnavailable``, exit code 2) that says where the token goes and how to do the step by hand. No
message, print or log carries a credential: every text that leaves this module is scrubbed of them.
``kaggle.dry_run=true`` prints what would be done and touches no network.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from weakcell.config import Config
from weakcell.errors import StageError
from weakcell.kagglekit.kernels import METADATA_FILE
from weakcell.kagglekit.naming import (
    PLACEHOLDER_OWNER,
    competition_key,
    competition_slug,
    kaggle_config_dir,
    token_path,
)
from weakcell.outputs import atomic_write, atomic_write_json

COMPLETE_MARKER = ".kaggle-download-complete.json"
TOKEN_URL = "https://www.kaggle.com/settings/api"
SUBMISSION_FILE = "submission.csv"  # what every generated kernel writes into /kaggle/working


class KaggleUnavailable(OSError):
    """No credentials, no network, or a refusal by Kaggle; the message says what to do instead."""


# ---------------------------------------------------------------------------------------- credentials


def credentials_source() -> str | None:
    """Where the Kaggle client would find credentials (a variable or file name, never a value), or None."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "$KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "$KAGGLE_USERNAME / $KAGGLE_KEY"
    home = Path.home() / ".kaggle"
    for path in (
        kaggle_config_dir() / "kaggle.json",
        home / "access_token",
        home / "access_token.txt",
        home / "credentials.json",  # `kaggle auth login`
    ):
        if path.is_file():
            return str(path)
    return None


def _secrets() -> list[str]:
    """Credential values that must never appear in output: the variables and the key in kaggle.json."""
    values = [os.environ.get(name, "") for name in ("KAGGLE_KEY", "KAGGLE_API_TOKEN")]
    with contextlib.suppress(OSError, ValueError, AttributeError):
        values.append(str(json.loads((kaggle_config_dir() / "kaggle.json").read_text()).get("key", "")))
    return [value for value in values if len(value) >= 4]


def scrub(text: str) -> str:
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


def no_credentials_message(by_hand: str) -> str:
    token = token_path()
    return (
        f"no Kaggle credentials: create a token at {TOKEN_URL} (Create New Token) and save the downloaded "
        f"kaggle.json as {token} (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY.\n  {by_hand}"
    )


def _describe(err: BaseException, by_hand: str, slug: str) -> str:
    """One line for a failed Kaggle call: what went wrong and the way out."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    kind = type(err).__name__
    if status == 401:
        text = f"Kaggle refused the credentials of {credentials_source()} (401): create a new token at {TOKEN_URL}"
    elif status == 403:
        text = (
            f"Kaggle refused access (403): accept the rules of https://www.kaggle.com/competitions/{slug}/rules "
            "with this account (or check the owner of the ids)"
        )
    elif status == 404:
        text = f"Kaggle does not know it (404): check the competition, dataset and kernel ids ({slug})"
    elif "Connection" in kind or "Timeout" in kind or isinstance(err, OSError):
        text = f"could not reach kaggle.com ({kind}): check the network"
    else:
        text = f"the Kaggle API failed ({kind}: {str(err)[:300]})"
    return scrub(f"{text}\n  {by_hand}")


def connect(by_hand: str, slug: str) -> Any:
    """An authenticated ``KaggleApi``, or ``KaggleUnavailable`` naming where the token goes."""
    source = credentials_source()
    if source is None:
        raise KaggleUnavailable(no_credentials_message(by_hand))
    swallowed = io.StringIO()  # import-time authentication prints its own long help: not ours to show
    try:
        with contextlib.redirect_stdout(swallowed), contextlib.redirect_stderr(swallowed):
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
    except ImportError:
        raise KaggleUnavailable(
            "the kaggle package is not installed: `make install` (it installs weakcell[kaggle]) or "
            "pip install 'weakcell[kaggle]'"
        ) from None
    except SystemExit:
        raise KaggleUnavailable(
            scrub(f"Kaggle did not accept the credentials of {source}: create a new token at {TOKEN_URL}")
        ) from None
    except Exception as err:
        raise KaggleUnavailable(_describe(err, by_hand, slug)) from None
    return api


def call(action: Callable[[], Any], by_hand: str, slug: str) -> Any:
    """Run one API call; any failure becomes ``KaggleUnavailable`` with one scrubbed line."""
    try:
        return action()
    except KaggleUnavailable:
        raise
    except Exception as err:
        raise KaggleUnavailable(_describe(err, by_hand, slug)) from None
    except SystemExit:  # the client exits on some refusals
        raise KaggleUnavailable(scrub(f"the Kaggle client stopped\n  {by_hand}")) from None


# ------------------------------------------------------------------------------------------ download


def download_dir(cfg: Config, key: str) -> Path:
    """``data.dir`` for the configured dataset, else ``{paths.data}/<key>/``."""
    return cfg.data_dir if key == cfg.data.dataset else cfg.path(cfg.paths.data) / key


def is_complete(folder: Path, slug: str) -> bool:
    marker = folder / COMPLETE_MARKER
    try:
        return bool(json.loads(marker.read_text()).get("competition") == slug)
    except (OSError, ValueError, AttributeError):
        return False


def unzip(archive: Path, folder: Path) -> int:
    """Extract ``archive`` into ``folder``, resumable: members already there at their size are skipped,
    each one is written to ``.part`` and renamed. Returns the number of files."""
    root = folder.resolve()
    with zipfile.ZipFile(archive) as bundle:
        members = [m for m in bundle.infolist() if not m.is_dir()]
        for member in tqdm(members, desc=f"unzip {archive.name}", unit="file", dynamic_ncols=True):
            target = (folder / member.filename).resolve()
            if not target.is_relative_to(root):
                raise StageError(
                    f"{archive} holds {member.filename!r}, outside {folder}: refusing to extract"
                )
            if target.is_file() and target.stat().st_size == member.file_size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, functools.partial(_extract, bundle, member))
    return len(members)


def _extract(bundle: zipfile.ZipFile, member: zipfile.ZipInfo, path: Path) -> None:
    with bundle.open(member) as source, path.open("wb") as sink:
        shutil.copyfileobj(source, sink, 2**20)


def download(cfg: Config) -> list[Path]:
    """``make download``: each competition of ``kaggle.download`` into ``data/<dataset>/``, unzipped.
    Resumable: a partial archive is resumed by the client, unzipping skips finished files, and a finished
    folder (its marker file) is skipped unless ``force``."""
    plan = [(key, competition_slug(cfg, key), download_dir(cfg, key)) for key in cfg.kaggle.download]
    todo = []
    for key, slug, folder in plan:
        if is_complete(folder, slug) and not cfg.force:
            print(f"download: {slug} is already in {folder} (FORCE=1 fetches it again)")
        else:
            todo.append((key, slug, folder))
    for key, slug, folder in todo:
        by_hand = (
            f"Or place the data by hand: download the archive from https://www.kaggle.com/competitions/{slug}/data "
            f"and unzip it into {folder}/ (read as data.dataset={key})."
        )
        command = f"kaggle competitions download -c {slug} -p {folder}"
        if cfg.kaggle.dry_run:
            print(
                f"download (dry run): would run `{command}`, then unzip {folder / (slug + '.zip')} into {folder}"
            )
            continue
        api = connect(by_hand, slug)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"download: {slug} -> {folder} (an interrupted download resumes when run again)")
        fetch = functools.partial(api.competition_download_files, slug, path=str(folder), quiet=False)
        call(fetch, by_hand, slug)
        archive = folder / f"{slug}.zip"
        if not archive.is_file():
            raise FileNotFoundError(f"the download left no {archive}; {by_hand}")
        n_files = unzip(archive, folder)
        marker = folder / COMPLETE_MARKER
        atomic_write_json(marker, {"competition": slug, "files": n_files}, indent=None)
        if not cfg.kaggle.keep_zip:
            archive.unlink()
        print(f"download: {slug}: {n_files} files -> {folder}")
    return [folder for _, _, folder in plan]


# -------------------------------------------------------------------------------------------- submit


def _submission_file(cfg: Config) -> Path:
    if cfg.kaggle.file:
        return cfg.path(cfg.kaggle.file)
    return cfg.submission_dir / "image_level.csv"


def submit_file(cfg: Config, slug: str) -> None:
    """A file competition (the 2018 format ``Id,Predicted``): validate against the sample submission (an
    inferred file must also be completely published), then submit it."""
    from weakcell.data.datasets import get_dataset
    from weakcell.submission import check_published, validate_image_level

    path = _submission_file(cfg)
    if not path.is_file():
        raise FileNotFoundError(
            f"no {path} to submit: run `make infer`, or name the file with kaggle.file=..."
        )
    if not cfg.kaggle.file:
        check_published(path)
    spec = get_dataset(competition_key(cfg))
    sample = download_dir(cfg, spec.name) / spec.sample_submission
    if not sample.is_file():
        raise FileNotFoundError(
            f"no sample submission at {sample} to check the rows of {path} against: `make download` puts it there"
        )
    stats = validate_image_level(path, sample, spec.n_classes)
    message = cfg.kaggle.message.format(name=cfg.name)
    print(f"submit: {path} is valid ({stats['rows']} rows, {stats['labels']} labels)")
    if cfg.kaggle.dry_run:
        print(f"submit (dry run): would run `kaggle competitions submit -c {slug} -f {path} -m {message!r}`")
        return
    by_hand = f"Or submit by hand: https://www.kaggle.com/competitions/{slug}/submit, upload {path}."
    api = connect(by_hand, slug)
    call(lambda: api.competition_submit(str(path), message, slug, quiet=True), by_hand, slug)
    print(
        f"submit: {path} sent to {slug}; its score appears at https://www.kaggle.com/competitions/{slug}/submissions"
    )


def check_kernel(folder: Path) -> dict[str, Any]:
    """The generated kernel folder is complete and offline; returns its metadata."""
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no {meta_path}: run `make kernels` first")
    metadata: dict[str, Any] = json.loads(meta_path.read_text())
    script = folder / metadata["code_file"]
    compile(script.read_text(), str(script), "exec")  # a SyntaxError is a bug of the template
    if metadata.get("enable_internet") is not False:
        raise StageError(
            f"{meta_path} turns the internet on: code competitions run offline; `make kernels` again"
        )
    return metadata


def next_steps(metadata: dict[str, Any], slug: str, url: str | None = None) -> str:
    kernel_id = metadata["id"]
    url = url or f"https://www.kaggle.com/code/{kernel_id}"
    datasets = ", ".join(metadata["dataset_sources"])
    return "\n".join(
        [
            "next steps on kaggle.com:",
            f"  1. the datasets it attaches must exist there: {datasets} (upload commands: make wheels, make weights-dataset)",
            f"  2. open {url}; the pushed version runs once (Logs tab, or `kaggle kernels status {kernel_id}`);",
            "     when it finishes, its Output tab lists submission.csv",
            "  3. submit that version: `make submit-kernel VERSION=<n>` (n: the version pushed), or "
            f"https://www.kaggle.com/competitions/{slug}/submit -> Notebook -> {kernel_id.split('/')[-1]}, "
            "that version, submission.csv -> Submit",
            "  4. Kaggle reruns the kernel on the hidden test set; the score appears under My Submissions",
        ]
    )


def submit_kernel(cfg: Config, slug: str) -> None:
    """The code competition: check the generated kernel, push it, print what to click next."""
    from weakcell.data.datasets import get_dataset
    from weakcell.kagglekit.agreement import require_agreement
    from weakcell.submission import check_published, validate_cell_level

    folder = cfg.path(cfg.paths.kernels) / cfg.kaggle.submit_variant
    metadata = check_kernel(folder)
    if not cfg.kaggle.dry_run and metadata["id"].startswith(f"{PLACEHOLDER_OWNER}/"):
        raise StageError(
            f"{folder / METADATA_FILE} has no Kaggle username in its id ({metadata['id']}): "
            "`make kernels ARGS=kaggle.owner=<you>` (or set KAGGLE_USERNAME), then submit again"
        )
    # the kernel must predict with the models the weights dataset holds (a stale one fails only on Kaggle)
    require_agreement(cfg, "submit", need=("dataset", "kernel"))
    local = cfg.submission_dir / "cell_level.csv"
    if local.is_file():  # the kernel predicts on Kaggle; a local submission of the same run is checked too
        check_published(local)
        sample = cfg.data_dir / get_dataset(cfg.data.dataset).sample_submission
        if not sample.is_file():
            raise FileNotFoundError(
                f"no sample submission at {sample} to check the rows of {local} against: `make download` "
                "(or data.dir=...) puts it there"
            )
        stats = validate_cell_level(local, sample, n_classes=get_dataset(competition_key(cfg)).n_classes)
        print(
            f"submit: the local {local} is valid ({stats['rows']} rows, {stats['predictions']} predictions)"
        )
    command = f"kaggle kernels push -p {folder}"
    if cfg.kaggle.dry_run:
        print(f"submit (dry run): would run `{command}`\n{next_steps(metadata, slug)}")
        return
    by_hand = f"Or push by hand: `{command}` once the credentials work, or paste {metadata['code_file']} into a new notebook."
    api = connect(by_hand, slug)
    response = call(lambda: api.kernels_push(str(folder)), by_hand, slug)
    error = getattr(response, "error", None)
    if error:
        raise KaggleUnavailable(scrub(f"Kaggle refused the kernel push: {error}\n  {by_hand}"))
    version = getattr(response, "version_number", None) or getattr(response, "versionNumber", None)
    print(f"submit: pushed {metadata['id']}" + (f" (version {version})" if version else ""))
    print(next_steps(metadata, slug, getattr(response, "url", None)))


def submit_kernel_output(cfg: Config) -> None:
    """``make submit-kernel VERSION=n``: submit ``submission.csv`` of version ``kaggle.kernel_version`` of the
    pushed kernel to the 2021 code competition (``kaggle competitions submit <competition> -k <owner>/<slug>
    -f submission.csv -v <n>``); Kaggle then reruns that version on the hidden test set."""
    key = competition_key(cfg)
    if key != "hpa2021":
        raise StageError(
            f"submit-kernel submits a kernel to the 2021 code competition; {key} takes a file: `make submit`"
        )
    slug = competition_slug(cfg, key)
    metadata = check_kernel(cfg.path(cfg.paths.kernels) / cfg.kaggle.submit_variant)
    kernel_id = metadata["id"]
    version = cfg.kaggle.kernel_version
    if version is None:
        raise StageError(
            f"which version of {kernel_id}? `make submit-kernel VERSION=<n>` (kaggle.kernel_version=<n>): "
            f"the number `make submit` printed, or `kaggle kernels status {kernel_id}`"
        )
    if kernel_id.startswith(f"{PLACEHOLDER_OWNER}/"):
        raise StageError(
            f"{kernel_id} names no Kaggle account: `make kernels ARGS=kaggle.owner=<you>`, then submit again"
        )
    message = cfg.kaggle.message.format(name=cfg.name)
    command = (
        f"kaggle competitions submit {slug} -k {kernel_id} -f {SUBMISSION_FILE} -v {version} -m {message!r}"
    )
    if cfg.kaggle.dry_run:
        print(f"submit-kernel (dry run): would run `{command}`")
        return
    by_hand = (
        f"Or by hand: https://www.kaggle.com/competitions/{slug}/submit -> Notebook -> "
        f"{kernel_id.split('/')[-1]}, version {version}, {SUBMISSION_FILE}."
    )
    api = connect(by_hand, slug)
    call(
        lambda: api.competition_submit_code(SUBMISSION_FILE, message, slug, kernel_id, version, quiet=True),
        by_hand,
        slug,
    )
    print(
        f"submit-kernel: version {version} of {kernel_id} submitted to {slug}; Kaggle reruns it on the hidden "
        f"test set, the score appears at https://www.kaggle.com/competitions/{slug}/submissions"
    )


def submit(cfg: Config) -> None:
    """``make submit``: a file submission for hpa2018, the kernel push for the 2021 code competition."""
    key = competition_key(cfg)
    slug = competition_slug(cfg, key)
    if key == "hpa2018":
        submit_file(cfg, slug)
    else:
        submit_kernel(cfg, slug)
