#!/usr/bin/env bash
# WikiText-103 for the paper's language-model runs: download, BPE, fairseq-preprocess.
set -euo pipefail

PROG=prepare-wikitext103.sh
# shellcheck source=scripts/prepare-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/prepare-lib.sh"

DEFAULT_SOURCE=https://wikitext.smerity.com/wikitext-103-v1.zip
# sha256 of OpenAI's GPT-2 encoder.json and vocab.bpe (the values tiktoken pins).
GPT2_ENCODER_SHA256=196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783
GPT2_VOCAB_SHA256=1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5

usage() {
    cat <<EOF
Usage: scripts/prepare-wikitext103.sh [options]

Downloads WikiText-103 (v1, the tokenized release), applies BPE to the train, valid and test
splits and binarizes them with fairseq-preprocess --only-source, the dictionary built from the
train split.

  --bpe gpt2|sentencepiece  gpt2 (default, the paper's): GPT-2 byte-level BPE; the dictionary
                            holds the GPT-2 ids that occur in the train split (the paper reports
                            44,256 entries), not all 50,257 of GPT-2.
                            sentencepiece: a BPE model trained on the train split; no GPT-2 files.
  --vocab-size N            sentencepiece vocabulary size (default 32000)
  --spm-sample-lines N      train sentencepiece on at most N random lines (WikiText lines are
                            paragraphs; default 300000; 0: all)
  --source URL|ZIP|DIR      WikiText-103: a URL of wikitext-103-v1.zip, a local copy of that zip,
                            or a directory holding wiki.{train,valid,test}.tokens
                            (default: \$WIKITEXT103_SOURCE, else $DEFAULT_SOURCE)
  --gpt2-dir DIR            encoder.json and vocab.bpe (default: data/gpt2_bpe of this repository,
                            OpenAI's GPT-2 files, the ones fairseq's recipe downloads)
  --gpt2-url URL            download encoder.json and vocab.bpe from URL/ instead (e.g. fairseq's
                            https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe; default: \$GPT2_BPE_URL)
  --raw-dir DIR             where downloads are kept (default data-raw/wikitext-103)
  --out DIR                 output directory (default data-bin/wikitext-103)
  --workers N               worker processes (default: the number of CPUs)
  --keep-text               keep the BPE text files in OUT/text
  --force                   redo the output even if it is complete
  -h, --help                this help

The output appears only when complete, with a file COMPLETE in it; a run that finds it complete
does nothing. Environment: PYTHON (default python3) runs the Python steps.
EOF
}

BPE=gpt2
VOCAB_SIZE=32000
SPM_SAMPLE_LINES=300000
SOURCE=${WIKITEXT103_SOURCE:-$DEFAULT_SOURCE}
GPT2_DIR=$REPO_ROOT/data/gpt2_bpe
GPT2_URL=${GPT2_BPE_URL:-}
RAW_DIR=data-raw/wikitext-103
OUT_DIR=data-bin/wikitext-103
WORKERS=$(cpu_count)
KEEP_TEXT=0
FORCE=0

while (($#)); do
    case $1 in
        --bpe) need_value "$@"; BPE=$2; shift 2 ;;
        --vocab-size) need_value "$@"; VOCAB_SIZE=$2; shift 2 ;;
        --spm-sample-lines) need_value "$@"; SPM_SAMPLE_LINES=$2; shift 2 ;;
        --source) need_value "$@"; SOURCE=$2; shift 2 ;;
        --gpt2-dir) need_value "$@"; GPT2_DIR=$2; shift 2 ;;
        --gpt2-url) need_value "$@"; GPT2_URL=$2; shift 2 ;;
        --raw-dir) need_value "$@"; RAW_DIR=$2; shift 2 ;;
        --out) need_value "$@"; OUT_DIR=$2; shift 2 ;;
        --workers) need_value "$@"; WORKERS=$2; shift 2 ;;
        --keep-text) KEEP_TEXT=1; shift ;;
        --force) FORCE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done
[[ $BPE == gpt2 || $BPE == sentencepiece ]] || die "--bpe must be gpt2 or sentencepiece, not '$BPE'"
[[ $VOCAB_SIZE =~ ^[1-9][0-9]*$ ]] || die "--vocab-size must be a positive integer, not '$VOCAB_SIZE'"
[[ $SPM_SAMPLE_LINES =~ ^[0-9]+$ ]] || die "--spm-sample-lines must be an integer, not '$SPM_SAMPLE_LINES'"
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, not '$WORKERS'"

exit_if_complete "$OUT_DIR"

is_url() { [[ $1 =~ ^[A-Za-z][A-Za-z0-9+.-]*:// ]]; }

# -- what is needed, checked before anything is written ----------------------------------------
modules=(fairseq_cli=fairseq tqdm=tqdm)
if [[ $BPE == gpt2 ]]; then
    modules+=(regex=regex)
else
    modules+=(sentencepiece=sentencepiece)
fi
require_python_modules "${modules[@]}"

SOURCE_ZIP=
SOURCE_DIR=
if is_url "$SOURCE"; then
    SOURCE_ZIP=$RAW_DIR/$(basename "${SOURCE%%[?#]*}")
    [[ -f $SOURCE_ZIP ]] || require_commands curl
elif [[ -d $SOURCE ]]; then
    for candidate in "$SOURCE" "$SOURCE/wikitext-103"; do
        if [[ -f $candidate/wiki.train.tokens ]]; then
            SOURCE_DIR=$candidate
            break
        fi
    done
    [[ -n $SOURCE_DIR ]] ||
        die "no wiki.train.tokens in $SOURCE (nor in $SOURCE/wikitext-103)" \
            "--source takes a directory holding wiki.{train,valid,test}.tokens, a wikitext-103-v1.zip or its URL"
elif [[ -f $SOURCE ]]; then
    SOURCE_ZIP=$SOURCE
else
    die "--source $SOURCE: no such file or directory, and not a URL" \
        "give a directory holding wiki.{train,valid,test}.tokens, a wikitext-103-v1.zip or its URL"
fi

if [[ $BPE == gpt2 ]]; then
    if [[ -n $GPT2_URL ]]; then
        GPT2_DIR=$RAW_DIR/gpt2_bpe
        [[ -f $GPT2_DIR/encoder.json && -f $GPT2_DIR/vocab.bpe ]] || require_commands curl
    else
        for name in encoder.json vocab.bpe; do
            [[ -f $GPT2_DIR/$name ]] ||
                die "GPT-2 BPE file missing: $GPT2_DIR/$name" \
                    "pass --gpt2-dir DIR with encoder.json and vocab.bpe, or download them with" \
                    "--gpt2-url https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe"
        done
    fi
fi

begin_output "$OUT_DIR"
WORK=$PARTIAL/work
mkdir -p "$WORK"
step begin "preparing WikiText-103 with $BPE BPE into $OUT (working in $PARTIAL)"

# -- the corpus ----------------------------------------------------------------------------------
if [[ -n $SOURCE_ZIP ]]; then
    if [[ ! -f $SOURCE_ZIP ]]; then
        download "$SOURCE" "$SOURCE_ZIP" \
            "or pass --source with another URL, a local wikitext-103-v1.zip, or a directory holding wiki.{train,valid,test}.tokens" \
            "(WikiText-103 v1 was first published at https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip)"
    fi
    step extract "extracting wiki.{train,valid,test}.tokens from $SOURCE_ZIP"
    SOURCE_DIR=$WORK/corpus
    "$PYTHON" - "$SOURCE_ZIP" "$SOURCE_DIR" <<'EOF' || die "could not extract WikiText-103 from $SOURCE_ZIP"
import os
import shutil
import sys
import zipfile

archive, dest = sys.argv[1:]
os.makedirs(dest, exist_ok=True)
try:
    with zipfile.ZipFile(archive) as z:
        for split in ("train", "valid", "test"):
            name = f"wiki.{split}.tokens"
            members = [m for m in z.namelist() if os.path.basename(m) == name]
            if not members:
                sys.exit(f"{archive} holds no {name}: is it WikiText-103 v1 (the tokenized release)?")
            with z.open(members[0]) as fin, open(os.path.join(dest, name), "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
except zipfile.BadZipFile as error:
    sys.exit(f"{archive} is not a zip file ({error}); remove it to download it again")
EOF
fi
for split in train valid test; do
    [[ -f $SOURCE_DIR/wiki.$split.tokens ]] || die "missing $SOURCE_DIR/wiki.$split.tokens"
done

# -- BPE -----------------------------------------------------------------------------------------
mkdir -p "$PARTIAL/bpe"
inputs=() outputs=()
for split in train valid test; do
    inputs+=("$SOURCE_DIR/wiki.$split.tokens")
    outputs+=("$WORK/$split.bpe")
done
if [[ $BPE == gpt2 ]]; then
    if [[ -n $GPT2_URL ]]; then
        for name in encoder.json vocab.bpe; do
            [[ -f $GPT2_DIR/$name ]] ||
                download "${GPT2_URL%/}/$name" "$GPT2_DIR/$name" \
                    "or pass --gpt2-dir DIR with encoder.json and vocab.bpe (this repository ships them in data/gpt2_bpe)"
        done
    fi
    for name in encoder.json vocab.bpe; do
        expected=$GPT2_ENCODER_SHA256
        [[ $name == vocab.bpe ]] && expected=$GPT2_VOCAB_SHA256
        actual=$("$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
            "$GPT2_DIR/$name")
        [[ $actual == "$expected" ]] || log "note: $GPT2_DIR/$name is not OpenAI's GPT-2 $name (sha256 $actual)"
        cp "$GPT2_DIR/$name" "$PARTIAL/bpe/$name"
    done
    step bpe "GPT-2 BPE of the three splits; workers: $WORKERS"
    "$PYTHON" "$PREPARE_PY/gpt2_bpe.py" --encoder-json "$GPT2_DIR/encoder.json" \
        --vocab-bpe "$GPT2_DIR/vocab.bpe" --inputs "${inputs[@]}" --outputs "${outputs[@]}" \
        --keep-empty --independent-inputs --workers "$WORKERS"
    bpe_summary="bpe: gpt2 (bpe/encoder.json, bpe/vocab.bpe)"
else
    step bpe "training a sentencepiece BPE model of $VOCAB_SIZE pieces on the train split, then encoding"
    "$PYTHON" "$PREPARE_PY/sentencepiece_bpe.py" --train-input "${inputs[0]}" \
        --model-prefix "$PARTIAL/bpe/spm" --vocab-size "$VOCAB_SIZE" --sample-lines "$SPM_SAMPLE_LINES" \
        --inputs "${inputs[@]}" --outputs "${outputs[@]}" --workers "$WORKERS"
    bpe_summary="bpe: sentencepiece, $VOCAB_SIZE pieces (bpe/spm.model)"
fi

# -- binarize ------------------------------------------------------------------------------------
step binarize "fairseq-preprocess --only-source (dictionary from the train split)"
"$PYTHON" -m fairseq_cli.preprocess --only-source \
    --trainpref "$WORK/train.bpe" --validpref "$WORK/valid.bpe" --testpref "$WORK/test.bpe" \
    --destdir "$PARTIAL" --workers "$WORKERS"

if ((KEEP_TEXT)); then
    mkdir -p "$PARTIAL/text"
    mv "$WORK"/*.bpe "$PARTIAL/text/"
fi
rm -rf "$WORK"
dict_size=$(($(wc -l <"$PARTIAL/dict.txt") + 4))
finish_output "source: $SOURCE" "$bpe_summary" "dictionary: $dict_size symbols (dict.txt plus bos, pad, eos, unk)"
log "dictionary: $dict_size symbols; train with: fairseq-train $OUT --task language_modeling_agg ..."
