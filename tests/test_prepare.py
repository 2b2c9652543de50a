"""scripts/prepare-wikitext103.sh, scripts/prepare-wmt14-en-de.sh and fairseq_agg.prepare,
offline, on data shipped in the repository.

The scripts run in smoke mode on miniatures laid out as the real downloads are: a
"wikitext-103" directory (and zip) cut from data/wikitext-2, a WMT14 raw-corpus directory
(Europarl, CommonCrawl and News Commentary files, newstest2013, the newstest2014 .sgm files) cut
from data/wmt14-en-de-sample, and the GPT-2 BPE files shipped in data/gpt2_bpe. Downloads are
exercised with file:// URLs. Each script run pays for a few fairseq imports (seconds each).
"""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
DATA = REPO / "data"
GPT2_DIR = DATA / "gpt2_bpe"
RUN_TIMEOUT = 300
BASH = shutil.which("bash") or "/bin/bash"

# The sha256 that tiktoken pins for OpenAI's GPT-2 encoder.json and vocab.bpe.
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
MOSES_ESCAPES = [("&apos;", "'"), ("&quot;", '"'), ("&lt;", "<"), ("&gt;", ">"),
                 ("&#91;", "["), ("&#93;", "]"), ("&#124;", "|"), ("&amp;", "&")]


def script_env(**extra):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_script(name, *args, env=None, check=True):
    proc = subprocess.run(
        [BASH, str(SCRIPTS / name), *map(str, args)], cwd=str(REPO), env=env or script_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=RUN_TIMEOUT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} exited with {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def write_lines(path, lines):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def assert_nothing_complete(root: Path, out: Path):
    """No output directory, no partial directory and no completion marker anywhere under root."""
    assert not out.exists()
    assert not list(root.glob(f"{out.name}.partial.*"))
    assert not list(root.rglob("COMPLETE"))


def load_split(prefix, dictionary):
    from fairseq.data import data_utils

    dataset = data_utils.load_indexed_dataset(str(prefix), dictionary)
    assert dataset is not None, f"{prefix} does not load"
    return dataset


# -- miniature corpora -------------------------------------------------------------------------
WIKI_LINES = {"train": 400, "valid": 60, "test": 60}


@pytest.fixture(scope="module")
def wikitext_dir(tmp_path_factory):
    """A "wikitext-103" directory: the first lines of each shipped WikiText-2 split."""
    root = tmp_path_factory.mktemp("wikitext") / "wikitext-103"
    for split, n in WIKI_LINES.items():
        write_lines(root / f"wiki.{split}.tokens", read_lines(DATA / "wikitext-2" / f"wiki.{split}.tokens")[:n])
    return root


def unescape(line):
    for escaped, char in MOSES_ESCAPES:
        line = line.replace(escaped, char)
    return line


@pytest.fixture(scope="module")
def wmt_raw(tmp_path_factory):
    """The raw WMT14 layout the archives extract to, cut from the shipped (tokenized) sample with
    Moses' escapes undone; the test set as newstest2014 .sgm files."""
    raw = tmp_path_factory.mktemp("wmt14-raw")
    sample = DATA / "wmt14-en-de-sample"
    for lang, role in (("en", "src"), ("de", "ref")):
        train = [unescape(line) for line in read_lines(sample / f"train.{lang}")]
        write_lines(raw / f"training/europarl-v7.de-en.{lang}", train[:1000])
        write_lines(raw / f"commoncrawl.de-en.{lang}", train[1000:2000])
        write_lines(raw / f"training/news-commentary-v9.de-en.{lang}", train[2000:])
        write_lines(raw / f"dev/newstest2013.{lang}", [unescape(line) for line in read_lines(sample / f"valid.{lang}")])
        test = [unescape(line) for line in read_lines(sample / f"test.{lang}")]
        segments = [f'<seg id="{i}">{line}</seg>' for i, line in enumerate(test, 1)]
        write_lines(
            raw / f"test-full/newstest2014-deen-{role}.{lang}.sgm",
            ['<refset setid="newstest2014" srclang="any" trglang="de">', '<doc sysid="ref" docid="1" origlang="en">']
            + segments + ["</doc>", "</refset>"],
        )
    return raw


# The archives of the WMT14 recipe and the files of each that it reads.
WMT_ARCHIVES = {
    "training-parallel-europarl-v7.tgz": ["training/europarl-v7.de-en.en", "training/europarl-v7.de-en.de"],
    "training-parallel-commoncrawl.tgz": ["commoncrawl.de-en.en", "commoncrawl.de-en.de"],
    "training-parallel-nc-v9.tgz": ["training/news-commentary-v9.de-en.en", "training/news-commentary-v9.de-en.de"],
    "dev.tgz": ["dev/newstest2013.en", "dev/newstest2013.de"],
    "test-full.tgz": ["test-full/newstest2014-deen-src.en.sgm", "test-full/newstest2014-deen-ref.de.sgm"],
}


@pytest.fixture(scope="module")
def wmt_mirror(wmt_raw, tmp_path_factory):
    """A download mirror: the recipe's five archives, packed from the raw layout, each with an
    extra file that the recipe does not read (as the real ones hold other language pairs)."""
    mirror = tmp_path_factory.mktemp("wmt14-mirror")
    for archive, members in WMT_ARCHIVES.items():
        with tarfile.open(mirror / archive, "w:gz") as tar:
            for member in members:
                tar.add(wmt_raw / member, arcname=member)
            tar.add(wmt_raw / members[0], arcname=f"{members[0]}.unused")
    return mirror


# -- WikiText-103 ------------------------------------------------------------------------------
def _sigint_at_default():
    # Ctrl-C at a terminal reaches a script whose SIGINT is at its default. A test run started in
    # the background of a non-interactive shell (`cmd &` in a script, nohup, some CI runners)
    # would hand SIGINT down ignored, and bash can trap no signal that was ignored on entry.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(script, args, env):
    return subprocess.Popen(
        [BASH, str(SCRIPTS / script), *map(str, args)], cwd=str(REPO), env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=_sigint_at_default,
    )


def _interrupt_at_step(proc, root, out, sig, step):
    """Send ``sig`` to the run's process group once its log marks the start of ``step``
    ("step NAME:", logged right before the step's command is launched), the partial directory
    written; returns the whole log."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if f"] step {step}: " in line:
            break
    else:
        raise AssertionError("the run ended before its step '%s':\n%s" % (step, "".join(seen)))
    assert list(root.glob(f"{out.name}.partial.*/work")), "the run had not started writing"
    os.killpg(proc.pid, sig)
    return "".join(seen) + proc.communicate(timeout=60)[0]


def test_wikitext_sentencepiece_after_interrupted_runs(wikitext_dir, tmp_path, wmt_run):
    import sentencepiece as spm
    from fairseq.data import Dictionary

    out = tmp_path / "wikitext-103"
    args = ["--bpe", "sentencepiece", "--vocab-size", 700, "--source", wikitext_dir, "--out", out,
            "--raw-dir", tmp_path / "raw", "--workers", 2]

    # Ctrl-C as fairseq-preprocess is launched, while it is still starting: the run cleans up
    # after itself
    log = _interrupt_at_step(_start("prepare-wikitext103.sh", args, script_env()), tmp_path, out, signal.SIGINT,
                             "binarize")
    assert "nothing was written to" in log
    assert_nothing_complete(tmp_path, out)

    # killed outright in the same step: its partial directory stays behind, but nothing looks complete
    _interrupt_at_step(_start("prepare-wikitext103.sh", args, script_env()), tmp_path, out, signal.SIGKILL,
                       "binarize")
    assert len(list(tmp_path.glob("wikitext-103.partial.*"))) == 1
    assert not out.exists() and not list(tmp_path.rglob("COMPLETE"))

    log = run_script("prepare-wikitext103.sh", *args).stdout
    assert "left by an interrupted run" in log
    assert (out / "COMPLETE").is_file() and not list(tmp_path.glob("wikitext-103.partial.*"))

    dictionary = Dictionary.load(str(out / "dict.txt"))
    assert len(dictionary) <= 700 + 4 + 8
    processor = spm.SentencePieceProcessor(model_file=str(out / "bpe" / "spm.model"))
    assert processor.get_piece_size() == 700
    for split, n in WIKI_LINES.items():
        dataset = load_split(out / split, dictionary)
        assert len(dataset) == n  # one sentence per line, empty lines included
    train = load_split(out / "train", dictionary)
    lines = read_lines(wikitext_dir / "wiki.train.tokens")
    for i in (1, 2, 3):
        pieces = [dictionary[j] for j in train[i][:-1]]
        assert train[i][-1] == dictionary.eos()
        assert processor.decode(pieces) == processor.decode(processor.encode(lines[i].strip()))

    # a complete output is left as it is: no step runs, nothing is rewritten
    written = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    log = run_script("prepare-wikitext103.sh", *args).stdout
    assert "already complete" in log and "] step " not in log
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == written


def test_wikitext_gpt2_downloaded_from_urls(wikitext_dir, tmp_path, wmt_run):
    from fairseq.data import Dictionary
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    archive = tmp_path / "wikitext-103-v1.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for split in WIKI_LINES:
            z.write(wikitext_dir / f"wiki.{split}.tokens", f"wikitext-103/wiki.{split}.tokens")
    out, raw = tmp_path / "bin", tmp_path / "raw"
    out.mkdir()
    (out / "stale.txt").write_text("not from this script")

    refused = run_script("prepare-wikitext103.sh", "--source", archive.as_uri(), "--raw-dir", raw, "--out", out,
                         check=False)
    assert refused.returncode == 1 and "no COMPLETE marker" in refused.stdout

    run_script("prepare-wikitext103.sh", "--source", archive.as_uri(), "--gpt2-url", GPT2_DIR.as_uri(),
               "--raw-dir", raw, "--out", out, "--workers", 2, "--force")
    assert (raw / "wikitext-103-v1.zip").read_bytes() == archive.read_bytes()
    assert (raw / "gpt2_bpe" / "vocab.bpe").read_bytes() == (GPT2_DIR / "vocab.bpe").read_bytes()
    assert not list(raw.rglob("*.part"))
    assert (out / "COMPLETE").is_file() and not (out / "stale.txt").exists()
    assert (out / "bpe" / "encoder.json").is_file()

    dictionary = Dictionary.load(str(out / "dict.txt"))
    ids = [dictionary[i] for i in range(dictionary.nspecial, len(dictionary))]
    gpt2_ids = [int(s) for s in ids if not s.startswith("madeupword")]
    assert all(0 <= i < 50257 for i in gpt2_ids)
    assert len(gpt2_ids) < 50257  # only the ids seen in train, as in the paper

    encoder = get_encoder(str(GPT2_DIR / "encoder.json"), str(GPT2_DIR / "vocab.bpe"))
    lines = read_lines(wikitext_dir / "wiki.train.tokens")
    train = load_split(out / "train", dictionary)
    assert len(train) == len(lines)
    for i in range(0, len(lines), 37):
        decoded = encoder.decode([int(dictionary[j]) for j in train[i][:-1]])
        assert decoded == lines[i].strip()


def test_gpt2_files_are_openai_and_encoder_matches_known_ids(tmp_path):
    from fairseq_agg.prepare.gpt2_bpe import encode_files

    for name, sha256 in GPT2_SHA256.items():
        assert hashlib.sha256((GPT2_DIR / name).read_bytes()).hexdigest() == sha256

    write_lines(tmp_path / "in.txt", ["Hello world", "", " Hello world ", "The quick brown fox"] * 300)
    encoded = tmp_path / "out.txt"
    args = (str(GPT2_DIR / "encoder.json"), str(GPT2_DIR / "vocab.bpe"), [str(tmp_path / "in.txt")], [str(encoded)])
    assert encode_files(*args, keep_empty=True, workers=2) == (1200, 0)
    lines = read_lines(encoded)
    assert lines[:4] == ["15496 995", "", "15496 995", "464 2068 7586 21831"]
    assert encode_files(*args, keep_empty=False, workers=1) == (900, 300)
    assert read_lines(encoded)[:3] == ["15496 995", "15496 995", "464 2068 7586 21831"]


# -- WMT14 En-De -------------------------------------------------------------------------------
WMT_MERGES = 400


@pytest.fixture(scope="module")
def wmt_run(wmt_mirror, tmp_path_factory):
    """The WMT smoke run, downloading from the mirror into an empty raw directory; started in the
    background when first requested: the WikiText tests ask for it so that it runs alongside them
    (the scripts spend much of their time importing fairseq, on one core)."""
    root = tmp_path_factory.mktemp("wmt14-out")
    out = root / "wmt14_en_de"
    log = root / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [BASH, str(SCRIPTS / "prepare-wmt14-en-de.sh"), "--raw-dir", str(root / "raw"), "--out", str(out),
             "--mirror", wmt_mirror.as_uri(), "--bpe-tokens", str(WMT_MERGES), "--workers", "2", "--keep-text"],
            cwd=str(REPO), env=script_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def finished():
        rc = proc.wait(timeout=RUN_TIMEOUT)
        assert rc == 0, f"prepare-wmt14-en-de.sh exited with {rc}:\n{log.read_text()[-6000:]}"
        return out

    yield finished
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_wmt14_smoke_run_binarizes_a_joined_dictionary(wmt_run):
    from fairseq.data import Dictionary
    from sacremoses import MosesTokenizer

    out = wmt_run()
    merges = WMT_MERGES
    assert (out / "COMPLETE").is_file()
    assert not list(out.parent.glob("*.partial.*"))
    raw = out.parent / "raw"
    for archive, members in WMT_ARCHIVES.items():
        assert (raw / archive).is_file()
        for member in members:
            assert (raw / member).is_file()
        assert not (raw / f"{members[0]}.unused").exists()
    assert not list(raw.glob(".extract.*")) and not list(raw.glob("*.part"))
    code = read_lines(out / "code")
    assert code[0].startswith("#version") and 0 < len(code) - 1 <= merges
    assert (out / "dict.en.txt").read_bytes() == (out / "dict.de.txt").read_bytes()
    dictionary = Dictionary.load(str(out / "dict.en.txt"))
    assert len(dictionary) == len(read_lines(out / "dict.en.txt")) + 4

    sizes = {}
    for split in ("train", "valid", "test"):
        en = load_split(out / f"{split}.en-de.en", dictionary)
        de = load_split(out / f"{split}.en-de.de", dictionary)
        text_en, text_de = read_lines(out / "text" / f"{split}.en"), read_lines(out / "text" / f"{split}.de")
        assert len(en) == len(de) == len(text_en) == len(text_de)
        sizes[split] = len(en)
        # the binarized sentence is the BPE text, nothing unknown in train
        assert dictionary.string(en[0]) == text_en[0]
        if split == "train":
            assert all(dictionary.unk() not in de[i] for i in range(len(de)))
        if split != "test":  # clean-corpus-n: 1 to 250 tokens, length ratio at most 1.5
            for a, b in zip(text_en, text_de):
                na, nb = len(a.split()), len(b.split())
                assert 1 <= na <= 250 and 1 <= nb <= 250 and na / nb <= 1.5 and nb / na <= 1.5
    assert sizes["test"] == 300  # the test set is not cleaned
    assert 0 < sizes["train"] < 3000 and 0 < sizes["valid"] <= 300

    # the test set: the text of each <seg>, tokenised with aggressive hyphen splitting and escaping
    first_segment = unescape(read_lines(DATA / "wmt14-en-de-sample" / "test.de")[0])
    expected = MosesTokenizer(lang="de").tokenize(first_segment, aggressive_dash_splits=True, return_str=True)
    assert read_lines(out / "text" / "test.de")[0].replace("@@ ", "") == expected
    assert "@-@" in " ".join(read_lines(out / "text" / "train.en"))
    # the raw German side for detokenized sacreBLEU: one untokenized segment per test pair
    reference = read_lines(out / "test.raw.de")
    assert len(reference) == 300 and reference[0] == " ".join(first_segment.split())


def test_clean_corpus_rules(tmp_path):
    from fairseq_agg.prepare.wmt import clean, sgm_segments

    pairs = [
        ("a  b |c", "x y z"),          # kept, as "a b c": whitespace collapsed, | removed
        ("", "x"),                     # empty side
        ("a b c d", "x y"),            # ratio 2
        ("a b c", "x y"),              # ratio 1.5: kept
        (" ".join(["w"] * 6), " ".join(["v"] * 5)),  # 6 words: over --max 5
    ]
    write_lines(tmp_path / "c.en", [a for a, _ in pairs])
    write_lines(tmp_path / "c.de", [b for _, b in pairs])
    assert clean(str(tmp_path / "c"), ("en", "de"), str(tmp_path / "o"), 1.5, 1, 5) == (5, 2)
    assert read_lines(tmp_path / "o.en") == ["a b c", "a b c"]
    assert read_lines(tmp_path / "o.de") == ["x y z", "x y"]

    write_lines(tmp_path / "t.sgm", ['<doc docid="1">', '<seg id="1"> Ein  Satz. </seg>', "<seg id=2>Zwei</seg>",
                                     "</doc>"])
    assert list(sgm_segments(str(tmp_path / "t.sgm"))) == ["Ein  Satz.", "Zwei"]


# -- failures ------------------------------------------------------------------------------------
def test_missing_python_modules_are_named(tmp_path):
    no_site = tmp_path / "python-without-packages"
    no_site.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    no_site.chmod(0o755)
    env = script_env(PYTHON=str(no_site))
    wiki = run_script("prepare-wikitext103.sh", "--bpe", "sentencepiece", "--out", tmp_path / "lm", env=env,
                      check=False)
    assert wiki.returncode == 1
    assert "missing Python module(s)" in wiki.stdout and "pip install sentencepiece" in wiki.stdout
    assert "scripts/setup.sh" in wiki.stdout  # fairseq
    wmt = run_script("prepare-wmt14-en-de.sh", "--out", tmp_path / "mt", env=env, check=False)
    assert wmt.returncode == 1
    assert "pip install sacremoses" in wmt.stdout and "pip install subword-nmt" in wmt.stdout
    assert_nothing_complete(tmp_path, tmp_path / "lm")
    assert_nothing_complete(tmp_path, tmp_path / "mt")


def _bin_dir(path, tools):
    """A directory of links to the given commands, for a PATH that has only those."""
    path.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        if found:
            (path / tool).symlink_to(found)
    return str(path)


def test_missing_commands_are_named_only_when_needed(wmt_raw, tmp_path):
    basics = ["dirname", "nproc", "date", "mkdir", "rm", "tr", "sed"]
    # an empty raw directory: the archives must be downloaded (curl) and extracted (tar)
    env = script_env(PATH=_bin_dir(tmp_path / "bin-tar", basics + ["tar", "find"]))
    proc = run_script("prepare-wmt14-en-de.sh", "--raw-dir", tmp_path / "raw", "--out", tmp_path / "mt", env=env,
                      check=False)
    assert proc.returncode == 1
    assert "missing command(s): curl" in proc.stdout and "apt-get install curl" in proc.stdout
    assert_nothing_complete(tmp_path, tmp_path / "mt")

    # the files extracted already: neither curl nor tar is needed, so the run starts working
    env = script_env(PATH=_bin_dir(tmp_path / "bin", basics))
    proc = _start("prepare-wmt14-en-de.sh", ["--raw-dir", wmt_raw, "--out", tmp_path / "mt"], env)
    log = _interrupt_at_step(proc, tmp_path, tmp_path / "mt", signal.SIGTERM, "tokenize")
    assert "error:" not in log and "nothing was written to" in log
    assert_nothing_complete(tmp_path, tmp_path / "mt")


def test_failed_downloads_name_the_url_and_leave_nothing(tmp_path):
    missing = (tmp_path / "nowhere").as_uri()
    wmt = run_script("prepare-wmt14-en-de.sh", "--raw-dir", tmp_path / "raw", "--out", tmp_path / "mt",
                     "--mirror", missing, check=False)
    assert wmt.returncode == 1
    assert f"download failed (curl exit code 37): {missing}/training-parallel-europarl-v7.tgz" in wmt.stdout
    assert_nothing_complete(tmp_path, tmp_path / "mt")
    assert not (tmp_path / "raw" / "training-parallel-europarl-v7.tgz").exists()

    wiki = run_script("prepare-wikitext103.sh", "--source", f"{missing}/wikitext-103-v1.zip",
                      "--raw-dir", tmp_path / "raw", "--out", tmp_path / "lm", check=False)
    assert wiki.returncode == 1
    assert f"download failed (curl exit code 37): {missing}/wikitext-103-v1.zip" in wiki.stdout
    assert "--source" in wiki.stdout
    assert_nothing_complete(tmp_path, tmp_path / "lm")

    local = run_script("prepare-wikitext103.sh", "--source", tmp_path / "no-such.zip", "--out", tmp_path / "lm",
                       check=False)
    assert local.returncode == 1 and "no such file or directory" in local.stdout
    assert_nothing_complete(tmp_path, tmp_path / "lm")


# -- replacing a complete output with --force ----------------------------------------------------
# A stand-in for a preparation script: prepare-lib.sh's output discipline around one file, so that
# a run takes milliseconds.
FAKE_PREPARE = """\
set -euo pipefail
PROG=fake-prepare.sh
source "$PREPARE_LIB"
FORCE=0
if [[ ${1:-} == --force ]]; then FORCE=1; fi
exit_if_complete "$OUT_DIR"
begin_output "$OUT_DIR"
echo new >"$PARTIAL/data.txt"
finish_output "fake output"
"""

# mv, passing through to the real one, that sends MV_SHIM_SIGNAL to the script calling it once it
# has moved a path P to P.old.* (finish_output moving the previous output aside): the run is
# stopped between that rename and the one that moves the new output in.
MV_SHIM = """\
#!/bin/sh
"{real_mv}" "$@" || exit $?
if [ $# -eq 2 ]; then
    case $2 in
        "$1".old.*) kill -s "$MV_SHIM_SIGNAL" "$PPID" ;;
    esac
fi
"""


def _mv_shim_env(tmp_path, signal_name, env):
    shim_dir = tmp_path / "shim"
    if not shim_dir.exists():
        shim_dir.mkdir()
        (shim_dir / "mv").write_text(MV_SHIM.format(real_mv=shutil.which("mv")))
        (shim_dir / "mv").chmod(0o755)
    return dict(env, PATH=f"{shim_dir}{os.pathsep}{env['PATH']}", MV_SHIM_SIGNAL=signal_name)


def _fake_prepare(tmp_path, *args, signal_name=None):
    driver = tmp_path / "fake-prepare.sh"
    if not driver.exists():
        driver.write_text(FAKE_PREPARE)
    env = script_env(PREPARE_LIB=str(SCRIPTS / "prepare-lib.sh"), OUT_DIR=str(tmp_path / "out"))
    if signal_name:
        env = _mv_shim_env(tmp_path, signal_name, env)
    return subprocess.run([BASH, str(driver), *args], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60)


def _complete_output(out, text="old"):
    out.mkdir()
    (out / "data.txt").write_text(f"{text}\n")
    (out / "COMPLETE").write_text(f"prepared by an earlier run ({text})\n")


@pytest.mark.parametrize("signal_name", ["KILL", "TERM"])
def test_force_stopped_between_the_renames_keeps_the_old_output(tmp_path, signal_name):
    out = tmp_path / "out"
    _complete_output(out)

    stopped = _fake_prepare(tmp_path, "--force", signal_name=signal_name)
    expected_rc = -signal.SIGKILL if signal_name == "KILL" else 128 + signal.SIGTERM  # the trap's exit 143
    assert stopped.returncode == expected_rc, stopped.stdout
    if signal_name == "KILL":  # no trap runs: the old output waits, moved aside, for the next run
        assert not out.exists()
        (moved,) = tmp_path.glob("out.old.*")
        assert (moved / "data.txt").read_text() == "old\n" and (moved / "COMPLETE").is_file()
    else:  # the trap moves it back, and says so
        assert "nothing was written to" in stopped.stdout and "previous output is back in place" in stopped.stdout
        assert (out / "data.txt").read_text() == "old\n" and (out / "COMPLETE").is_file()
        assert not list(tmp_path.glob("out.old.*")) and not list(tmp_path.glob("out.partial.*"))

    # the next run finds the old output complete (restoring it first if needed), and deletes nothing
    again = _fake_prepare(tmp_path)
    assert again.returncode == 0, again.stdout
    assert "already complete" in again.stdout
    assert ("restored" in again.stdout) == (signal_name == "KILL")
    assert (out / "data.txt").read_text() == "old\n" and (out / "COMPLETE").is_file()
    assert not list(tmp_path.glob("out.old.*"))

    # and --force, uninterrupted, replaces it, leaving nothing aside
    forced = _fake_prepare(tmp_path, "--force")
    assert forced.returncode == 0, forced.stdout
    assert (out / "data.txt").read_text() == "new\n" and "fake output" in (out / "COMPLETE").read_text()
    assert not list(tmp_path.glob("out.old.*")) and not list(tmp_path.glob("out.partial.*"))


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_force_after_a_killed_swap_restores_then_replaces(tmp_path):
    out = tmp_path / "out"
    # what a --force run killed between its renames leaves: the old output aside, the new complete
    moved = tmp_path / f"out.old.{_dead_pid()}"
    _complete_output(moved)
    partial = tmp_path / f"out.partial.{_dead_pid()}"
    _complete_output(partial, "new, unfinished swap")

    forced = _fake_prepare(tmp_path, "--force")
    assert forced.returncode == 0, forced.stdout
    assert f"restored {out} from {moved}" in forced.stdout
    assert (out / "data.txt").read_text() == "new\n"
    assert not moved.exists() and not partial.exists()

    # a stale output moved aside is deleted only once OUT is complete
    _complete_output(moved)
    shutil.rmtree(out)
    out.mkdir()  # not made by the script: --force replaces it, but the one aside is kept meanwhile
    forced = _fake_prepare(tmp_path, "--force")
    assert forced.returncode == 0, forced.stdout
    assert f"keeping {moved}" in forced.stdout and (moved / "COMPLETE").is_file()
    assert (out / "data.txt").read_text() == "new\n"
    forced = _fake_prepare(tmp_path, "--force")
    assert forced.returncode == 0 and not moved.exists(), forced.stdout


@pytest.mark.parametrize("script", ["prepare-wikitext103.sh", "prepare-wmt14-en-de.sh"])
def test_scripts_restore_an_output_moved_aside_first(tmp_path, script):
    """Each script, started after a --force run was killed between its renames, moves the old
    output back before anything else (here: finds it complete and stops)."""
    out = tmp_path / "out"
    moved = tmp_path / f"out.old.{_dead_pid()}"
    _complete_output(moved)
    proc = run_script(script, "--out", out, "--raw-dir", tmp_path / "raw")
    assert "restored" in proc.stdout and "already complete" in proc.stdout
    assert (out / "data.txt").read_text() == "old\n" and not moved.exists()


def test_wikitext_force_killed_between_the_renames(wikitext_dir, tmp_path):
    """The real script, killed by the mv shim right after moving the old output aside: the next
    run puts the old output back in place, complete, and deletes nothing."""
    out = tmp_path / "out"
    _complete_output(out)
    args = ["--source", wikitext_dir, "--out", out, "--raw-dir", tmp_path / "raw", "--workers", 1]
    killed = run_script("prepare-wikitext103.sh", *args, "--force", env=_mv_shim_env(tmp_path, "KILL", script_env()),
                        check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    assert "fairseq-preprocess" in killed.stdout and "done:" not in killed.stdout
    assert not out.exists()
    (moved,) = tmp_path.glob("out.old.*")
    assert (moved / "data.txt").read_text() == "old\n"

    again = run_script("prepare-wikitext103.sh", *args)
    assert f"restored {out} from {moved}" in again.stdout and "already complete" in again.stdout
    assert (out / "data.txt").read_text() == "old\n" and (out / "COMPLETE").is_file()
    assert not list(tmp_path.glob("out.old.*"))
