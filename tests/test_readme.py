"""README.md and docs/*.md tell the truth: the layout names every module there is, every
command in their ```sh blocks parses with the tool that runs it (keys of `-S` settings
included), the quick ones run (the served decoder's curl lines against a real `vae serve`; the
read-only dvc ones on the pipeline's state, in test_pipeline_dvc.py), and every link into a
Markdown file finds its heading. The long ones (a full `make repro`, an hour-long preset,
`make up`) are run by other tests or by hand: here they are checked for syntax and parameters."""
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from pipeline.params import Params

from helpers import BIN, ROOT, vae_serve

README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks() -> list[tuple[str, str, int, str]]:
    """(language, file, first line number, text) of every fenced block of the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S):
            found.append((match[1], doc.relative_to(ROOT).as_posix(), text.count("\n", 0, match.start()) + 2,
                          match[2]))
    return found


def commands() -> list[tuple[str, list[str]]]:
    """("file:line", words) of every command of the ```sh blocks: continued lines joined,
    comments and leading VAR=value assignments dropped."""
    found = []
    for language, name, first, text in blocks():
        lines = text.split("\n") if language == "sh" else []
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i]
            i += 1
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if words:
                found.append((f"{name}:{first + start}", words))
    return found


COMMANDS = commands()


def ids(command: tuple[str, list[str]]) -> str:
    return f"{command[0]} {' '.join(command[1])[:60]}"


def test_layout_names_every_module():
    layout = README[README.index("## Layout"):README.index("## Measured figures")]
    named = set(re.findall(r"[\w]+\.py", layout))
    modules = {p.name for folder in ("vae", "pipeline", "pipeline/serve") for p in (ROOT / folder).glob("*.py")
               if p.name != "__init__.py"}
    assert modules <= named, f"README's layout misses {sorted(modules - named)}"
    assert named - {"helpers.py", "conftest.py"} <= modules | {p.name for p in (ROOT / "benchmarks").glob("*.py")}


def test_every_block_says_whether_it_holds_commands():
    """```sh: commands, each checked below; ```text: listings. An untagged block would escape."""
    assert {language for language, *_ in blocks()} <= {"sh", "text"}
    assert len(COMMANDS) >= 30


# Beyond parsing, how each command is exercised, by its leading words: run as the docs give it
# (and where), or why it is parsed only. A new command must be placed here.
RUN = "run as written: "
EXERCISED = {
    ("curl",): RUN + "test_the_serve_commands_answer, against `vae serve`",
    ("vae", "env"): RUN + "test_the_environment_commands_run",
    ("vae", "--version"): RUN + "test_the_environment_commands_run",
    ("vae", "summary"): RUN + "test_the_environment_commands_run",
    ("dvc", "exp", "show"): RUN + "test_pipeline_dvc.py, on the repro fixture's state",
    ("dvc", "metrics"): RUN + "test_pipeline_dvc.py, on the repro fixture's state",
    ("dvc", "params", "diff"): RUN + "test_pipeline_dvc.py, on the repro fixture's state",
    ("dvc", "plots", "show"): RUN + "test_pipeline_dvc.py, on the repro fixture's state",
    ("dvc", "queue", "status"): RUN + "test_pipeline_dvc.py, on the repro fixture's state",
    ("vae", "encode"): RUN + "test_the_serve_commands_answer, in a folder holding models/ and data/mnist/",
    ("vae", "sample"): RUN + "test_the_serve_commands_answer, in a folder holding models/ and data/mnist/",
    ("vae", "serve"): "its own tests serve a folder, a file, a models:/ URI and --ray (test_serve.py, "
                      "test_pipeline_dvc.py)",
    ("dvc", "exp", "run"): "slow: full runs of 10 to 250 epochs; test_pipeline_dvc.py runs experiments on tiny params",
    ("vae", "sweep"): "slow: a sweep of full runs; test_local_stack.py sweeps tiny ones against `make up`",
    ("dvc", "queue", "logs"): "names a placeholder experiment",
    ("dvc", "push"): "changes the user's remote; test_pipeline_dvc.py pushes to S3 and pulls in a fresh clone",
    ("dvc", "remote", "modify"): "changes the user's .dvc/config.local; test_pipeline_dvc.py does it in a copy",
    ("make", "repro"): "slow: the whole default pipeline; its stages run in test_pipeline_dvc.py",
    ("make", "test"): "the suite itself",
    ("make", "lock"): "re-resolves uv.lock from the index; lock-check runs in every `make test`",
    ("make", "up"): "test_local_stack.py starts and stops the same stack through infra/local/stack.py",
    ("make", "down"): "test_local_stack.py",
    ("source",): "a shell builtin: the file it reads is checked to be one make writes",
    ("mlflow", "ui"): "a server; test_pipeline_dvc.py opens the UI of a real `mlflow server`",
    ("python", "benchmarks/gpu_check.py"): "needs a GPU to mean anything; test_gpu_check.py runs it with --quick",
    ("python3", "infra/node_install.py"): "for a node without an index; test_infra.py checks the venv it makes, "
                                          "and it ran by hand over a GPU image's layout (benchmarks/RESULTS.md)",
    (".venv/bin/vae", "env"): "`vae env` in a node's venv: test_the_environment_commands_run runs `vae env`",
    ("make", "gpu-kit"): "downloads onnxruntime-gpu (244 MiB); test_gpu_check.py builds a kit through "
                         "benchmarks/gpu_kit.py with a stand-in wheel",
    ("bash", "benchmarks/gpu_node.sh"): "test_gpu_check.py runs it on this CPU, a mode at a time, from a kit in parts",
    ("bash", "benchmarks/gpu_session.sh"): "test_gpu_check.py runs it on this CPU as three of the device tool's calls",
    ("bash", "benchmarks/gpu_rehearse.sh"): "minutes, over a stand-in of a GPU image that it installs from PyPI "
                                            "(5 GB); run by hand before a GPU session (benchmarks/RESULTS.md)",
    ("python", "benchmarks/gpu_pipeline.py"): "minutes of the whole pipeline, for a GPU node; run by hand on "
                                              "this CPU (benchmarks/RESULTS.md), its stages tested one by one",
}


def how_exercised(words: list[str]) -> list[str]:
    return [how for prefix, how in EXERCISED.items() if tuple(words[:len(prefix)]) == prefix]


def test_every_command_is_run_somewhere_or_says_why_not():
    unplaced = [f"{line}: {shlex.join(words)}" for line, words in COMMANDS if len(how_exercised(words)) != 1]
    assert not unplaced, f"place these in EXERCISED (exactly one entry each): {unplaced}"


def check_settings(words: list[str]) -> None:
    """Each `-S section.key=value` (a sweep's `a,b` each value) is a valid params set together."""
    raw: dict = {}
    for flag, setting in zip(words, words[1:]):
        if flag != "-S":
            continue
        key, value = setting.split("=", 1)
        section, name = key.split(".")
        if "," in value and not value.startswith("["):  # a sweep's grid: each value alone
            for cell in value.split(","):
                Params.model_validate({section: {name: yaml.safe_load(cell)}})
        else:
            raw.setdefault(section, {})[name] = yaml.safe_load(value)
    Params.model_validate(raw)


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def check_python(words: list[str]) -> None:
    """A script of the repository whose --help names every option the README gives it."""
    script = ROOT / words[1]
    assert script.is_file(), f"{words[1]} does not exist"
    shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
        assert option in shown.stdout, f"{words[1]} has no option {option}"


def check(words: list[str]) -> None:
    program, args = words[0].rsplit("/", 1)[-1], words[1:]  # .venv/bin/vae: vae
    if program == "dvc":
        from dvc.cli import parse_args

        parse_args(args)  # DvcParserError (after printing the usage) on an unknown command or option
        check_settings(args)
    elif program == "vae":
        from pipeline.cli import parser

        parser().parse_args(args)
    elif program == "make":
        assert set(args) <= makefile_targets(), f"the Makefile has no target {set(args) - makefile_targets()}"
    elif program == "mlflow":
        from mlflow.cli import cli

        context = cli.make_context("mlflow", list(args))
        cli.get_command(context, args[0]).make_context(args[0], list(args[1:]), parent=context)
    elif program in ("python", "python3"):
        check_python(words)
    elif program == "curl":  # run against a real server in test_the_serve_commands_answer
        assert any(a.startswith(("localhost:8000/", "http://127.0.0.1:8000/")) for a in args), words
    elif program == "bash":  # a script of the repository: its usage names each word given it
        script = ROOT / args[0]
        assert script.is_file(), f"{args[0]} does not exist"
        usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60).stderr
        assert all(word in usage for word in args[1:]), f"{args[0]}'s usage ({usage.strip()}) lacks one of {args[1:]}"
    elif program == "source":  # what `make` (the environment) or `make up` (the stack's) writes
        assert args in ([".venv/bin/activate"], [".stack/env"]), args
        assert (BIN / "activate").is_file() and '/ "env"' in (ROOT / "infra/local/stack.py").read_text()
    else:
        pytest.fail(f"no check for {program}: add one, or do not give the command")


@pytest.mark.parametrize("command", COMMANDS, ids=ids)
def test_every_command_parses(command):
    """Catches an option a tool does not have (`dvc repro -S`), a renamed params key, a
    subcommand or Makefile target that is gone, a script option that changed."""
    line, words = command
    try:
        check(words)
    except SystemExit as e:  # argparse's --version and --help exit 0; its errors 2
        assert e.code in (0, None), f"{line}: `{shlex.join(words)}` does not parse (exit {e.code})"
    except Exception as e:  # DVC, click and pydantic raise
        pytest.fail(f"{line}: `{shlex.join(words)}` does not parse: {type(e).__name__}: {e}")


@pytest.mark.integration  # starts `vae serve`
def test_the_serve_commands_answer(tmp_path, mnist_dir, monkeypatch, signals_kept):
    """Every `vae encode`, `vae sample` and curl line of the docs, as written, in a folder
    holding what `make repro` leaves (models/ with the three graphs at params.yaml's sizes,
    data/mnist/), the curl lines against `vae serve models/`: each succeeds. Catches a
    request the server refuses, e.g. an infer body shaped for another latent size. The `vae`
    lines run through the CLI's main in this process: the command's start-up once a line adds
    nothing (test_batch.py runs the command)."""
    from pipeline import cli
    from pipeline.export import export_decoder, export_encoder, export_score
    from vae.model import VAE, ImageDecoder

    params = Params()
    model = VAE(params.model.vae_config()).eval()
    (tmp_path / "models").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist").symlink_to(mnist_dir)
    export_decoder(ImageDecoder(model), model.config.latent_dim, tmp_path / "models/decoder.onnx", opset=18)
    export_encoder(model, tmp_path / "models/encoder.onnx", opset=18)
    export_score(model, params.export.score_k, tmp_path / "models/score.onnx", opset=18)
    batch = [words for _, words in COMMANDS if words[0] == "vae" and words[1] in ("encode", "sample")]
    assert len(batch) >= 2
    monkeypatch.chdir(tmp_path)
    for words in [*batch, ["vae", "sample", "--n", "1", "--out", "digit.png"]]:  # digit.png: as the docs say
        assert cli.main(words[1:]) == 0, f"`{shlex.join(words)}` failed"
    curls = [words for _, words in COMMANDS if words[0] == "curl"]
    assert len(curls) >= 5
    with vae_serve(str(tmp_path / "models"), tmp_path / "serve.log") as url:
        for words in curls:
            args = [re.sub(r"^(http://127\.0\.0\.1|localhost):8000", url, a) for a in words[1:]]
            done = subprocess.run(["curl", "--fail-with-body", *args], cwd=tmp_path, capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 0, f"`{shlex.join(words)}`: {done.stdout[:500]} {done.stderr}"
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "latents.csv").read_text().splitlines()) == 10_001  # a header and the test set


@pytest.mark.integration  # starts `vae`
def test_the_environment_commands_run():
    """`vae env`, `vae --version` and `vae summary` (with no outputs yet) as the README gives them."""
    for _, words in COMMANDS:
        if words[0] == "vae" and words[1:2] in (["env"], ["--version"], ["summary"]):
            assert subprocess.run([str(BIN / "vae"), *words[1:]], capture_output=True, timeout=120).returncode == 0


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_every_link_into_a_markdown_file_finds_its_heading(doc):
    """The contents list, the links between the docs and into RESULTS.md: a moved file or a
    renamed heading breaks no link silently."""
    for path, anchor in re.findall(r"\]\(([\w./-]*\.md)?(?:#([\w-]+))?\)", doc.read_text()):
        target = (doc.parent / path).resolve() if path else doc
        assert target.is_file(), f"{doc.name} links to {path}, which does not exist"
        anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", target.read_text(), re.M)}
        assert not anchor or anchor in anchors, f"{doc.name} links to {path}#{anchor}: no such heading"
