#!/bin/sh
# Prepare the RecSys Challenge 2015 (YooChoose) clicks for GRU4Rec training.
# Run `sh data_prepare.sh --help` for usage.  Each step records a stamp in
# OUT/.stamps/ only after its outputs are complete: its arguments and the size
# and sha256 of its inputs (and script) and outputs.  A step whose stamp still
# matches is skipped, so a second run does no work; any change of content
# reruns it, whatever the files' modification times say (cp -p, rsync -a, tar
# and 7z give replaced files old mtimes).
set -eu

usage() {
    cat <<'EOF'
usage: sh data_prepare.sh [--raw PATH | --prepared DIR] [--out DIR] [--url URL]
                          [--config PATH]

Turns yoochoose-clicks.dat into vocab.txt and session files, and writes
OUT/config.yaml ready to train on them:
    python -m paddlerec.run -m OUT/config.yaml

  --raw PATH       local yoochoose-clicks.dat (skips the download)
  --prepared DIR   GRU4Rec TSV splits already preprocessed (one file matching
                   *train_full*, one matching *test*, optionally one *train_tr*
                   and one *train_valid* for tuning; skips download and
                   preprocessing), e.g. a folder holding rsc15_train_full.tsv
                   and rsc15_test.tsv
  --out DIR        output folder (default: <repo>/data)
  --url URL        where to download from (default: the RecSys 2015 archive)
  --config PATH    config to adapt (default: <repo>/config.yaml)
  -h, --help       this help

Layout under OUT: raw/yoochoose-clicks.dat (download only),
prepared/rsc15_{train_full,test,train_tr,train_valid}.tsv,
converted/{train,test,train_tr,train_valid}.txt (original item ids), vocab.txt,
all_train/train.txt, all_test/test.txt (model ids), tune/ (the same for the
tuning split train_tr -> train_valid, when there is one), config.yaml.  Python: $PYTHON, else <repo>/.venv/bin/python, else python3.
EOF
}

die() {  # usage or input error: one line, exit 2
    echo "error: $1" >&2
    exit 2
}

need_value() {
    [ "$2" -ge 2 ] || die "$1 needs a value; see sh data_prepare.sh --help"
}

# absolute path of an existing file or directory
abspath() {
    if [ -d "$1" ]; then
        (cd "$1" && pwd -P)
    else
        printf '%s/%s\n' "$(cd "$(dirname "$1")" && pwd -P)" "$(basename "$1")"
    fi
}

case "$0" in
    */*) script_dir=${0%/*} ;;
    *) script_dir=. ;;
esac
REPO=$(cd "$script_dir" && pwd -P)

RAW=
PREPARED=
OUT=$REPO/data
URL=
CONFIG=$REPO/config.yaml
while [ $# -gt 0 ]; do
    case "$1" in
        --raw) need_value "$1" $#; RAW=$2; shift 2 ;;
        --raw=*) RAW=${1#*=}; shift ;;
        --prepared) need_value "$1" $#; PREPARED=$2; shift 2 ;;
        --prepared=*) PREPARED=${1#*=}; shift ;;
        --out) need_value "$1" $#; OUT=$2; shift 2 ;;
        --out=*) OUT=${1#*=}; shift ;;
        --url) need_value "$1" $#; URL=$2; shift 2 ;;
        --url=*) URL=${1#*=}; shift ;;
        --config) need_value "$1" $#; CONFIG=$2; shift 2 ;;
        --config=*) CONFIG=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1'; see sh data_prepare.sh --help" ;;
    esac
done

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then
    PY=$REPO/.venv/bin/python
else
    PY=python3
fi

[ -z "$RAW" ] || [ -z "$PREPARED" ] || die "--raw and --prepared exclude each other; pass one"
[ -z "$URL" ] || [ -z "$RAW$PREPARED" ] || die "--url is for downloading; drop it with --raw or --prepared"
if [ -n "$RAW" ]; then
    [ -f "$RAW" ] && [ -r "$RAW" ] || die "--raw file not readable, $RAW; pass the path of yoochoose-clicks.dat"
    RAW=$(abspath "$RAW")
fi
if [ -n "$PREPARED" ]; then
    [ -d "$PREPARED" ] || die "--prepared folder not found, $PREPARED; pass the folder of the TSV splits"
    PREPARED=$(abspath "$PREPARED")
fi
[ -f "$CONFIG" ] || die "config not found, $CONFIG; pass --config PATH (the config.yaml to adapt)"
CONFIG=$(abspath "$CONFIG")
mkdir -p "$OUT" 2>/dev/null && [ -d "$OUT" ] || die "cannot create --out folder, $OUT; pass a writable folder"
OUT=$(abspath "$OUT")
probe=$OUT/.write-test.$$
( : > "$probe" ) 2>/dev/null && rm -f "$probe" || die "cannot write in --out folder, $OUT; pass a writable folder"
# the config is adapted last: check it now, before any data work
"$PY" "$REPO/data/text2paddle.py" --out-dir "$OUT" --check-config "$CONFIG" \
    --workspace "$REPO" || exit $?
STAMPS=$OUT/.stamps
RAN=0

# find_one DIR PATTERN EXCLUDE: the single regular file in DIR matching
# PATTERN but not EXCLUDE
find_one() {
    found=
    count=0
    for candidate in "$1"/$2; do
        [ -f "$candidate" ] || continue
        case "${candidate##*/}" in $3) continue ;; esac
        found=$candidate
        count=$((count + 1))
    done
    [ "$count" -eq 1 ] || die "expected one file matching $2 in $1, found $count; pass a folder with GRU4Rec TSV splits"
    printf '%s\n' "$found"
}

# find_optional DIR PATTERN: the single regular file in DIR matching PATTERN, or
# nothing when there is none
find_optional() {
    found=
    count=0
    for candidate in "$1"/$2; do
        [ -f "$candidate" ] || continue
        found=$candidate
        count=$((count + 1))
    done
    [ "$count" -le 1 ] || die "expected at most one file matching $2 in $1, found $count; keep one"
    printf '%s\n' "$found"
}

# stamp_of KEY OUTPUT... -- INPUT...: KEY, then the size and sha256 of every
# file (a missing one as "missing PATH")
stamp_of() {
    printf '%s\n' "$1"
    shift
    "$PY" "$REPO/data/fingerprint.py" "$@"
}

# fresh STEP KEY OUTPUT... -- INPUT...: true when STEP's stamp is what
# stamp_of says now: same arguments, inputs and outputs of the same content
fresh() {
    stamp=$STAMPS/$1
    shift
    [ -f "$stamp" ] || return 1
    now=$(stamp_of "$@") || return 1
    [ "$(cat "$stamp")" = "$now" ]
}

begin() {  # begin STEP: announce it and drop its stamp until it completes
    echo "[$1] running"
    mkdir -p "$STAMPS"
    rm -f "$STAMPS/$1"
    RAN=1
}

done_step() {  # done_step STEP KEY OUTPUT... -- INPUT...: the outputs are complete
    step=$1
    shift
    stamp_of "$@" > "$STAMPS/.$step.tmp"
    mv "$STAMPS/.$step.tmp" "$STAMPS/$step"
}

skip() {
    echo "[$1] up to date (stamp $STAMPS/$1); skipping"
}

# 1. raw clicks ------------------------------------------------------------
if [ -z "$RAW" ] && [ -z "$PREPARED" ]; then
    URL=${URL:-https://s3-eu-west-1.amazonaws.com/yc-rdata/yoochoose-data.7z}
    RAW=$OUT/raw/yoochoose-clicks.dat
    key="download url=$URL"
    set -- "$RAW" -- "$REPO/data/download.py"
    if fresh download "$key" "$@"; then
        skip download
    else
        begin download
        case "$URL" in
            *.7z) "$PY" "$REPO/data/download.py" --url "$URL" --out "$OUT/raw/${URL##*/}" \
                      --extract-clicks "$RAW" ;;
            *) "$PY" "$REPO/data/download.py" --url "$URL" --out "$RAW" ;;
        esac
        done_step download "$key" "$@"
    fi
fi

# 2. preprocess: raw clicks → GRU4Rec TSV splits ---------------------------
if [ -n "$PREPARED" ]; then
    TRAIN_TSV=$(find_one "$PREPARED" '*train_full*' '')
    TEST_TSV=$(find_one "$PREPARED" '*test*' '*train*')
    echo "[preprocess] using prepared splits $TRAIN_TSV and $TEST_TSV"
else
    prefix=$OUT/prepared/rsc15
    TRAIN_TSV=${prefix}_train_full.tsv
    TEST_TSV=${prefix}_test.tsv
    key="preprocess raw=$RAW out=$prefix"
    set -- "$TRAIN_TSV" "$TEST_TSV" "${prefix}_train_tr.tsv" "${prefix}_train_valid.tsv" \
        -- "$RAW" "$REPO/data/preprocess.py"
    if fresh preprocess "$key" "$@"; then
        skip preprocess
    else
        begin preprocess
        "$PY" "$REPO/data/preprocess.py" "$RAW" --out-prefix "$prefix"
        done_step preprocess "$key" "$@"
    fi
fi

# 3. convert: TSV → one session per line (original item ids) ---------------
TRAIN_TXT=$OUT/converted/train.txt
TEST_TXT=$OUT/converted/test.txt
key="convert train=$TRAIN_TSV test=$TEST_TSV"
set -- "$TRAIN_TXT" "$TEST_TXT" -- "$TRAIN_TSV" "$TEST_TSV" "$REPO/data/convert_format.py"
if fresh convert "$key" "$@"; then
    skip convert
else
    begin convert
    "$PY" "$REPO/data/convert_format.py" "$TRAIN_TSV" "$TRAIN_TXT"
    "$PY" "$REPO/data/convert_format.py" "$TEST_TSV" "$TEST_TXT"
    done_step convert "$key" "$@"
fi

# 4. vocab from train; train and test in model ids -------------------------
key="vocab train=$TRAIN_TXT test=$TEST_TXT"
set -- "$OUT/vocab.txt" "$OUT/all_train/train.txt" "$OUT/all_test/test.txt" \
    -- "$TRAIN_TXT" "$TEST_TXT" "$REPO/data/text2paddle.py"
if fresh vocab "$key" "$@"; then
    skip vocab
else
    begin vocab
    "$PY" "$REPO/data/text2paddle.py" --out-dir "$OUT" --train "$TRAIN_TXT" --test "$TEST_TXT"
    done_step vocab "$key" "$@"
fi

# 4b. the tuning split train_tr -> train_valid (vocab from train_tr), when there is one
if [ -n "$PREPARED" ]; then
    TR_TSV=$(find_optional "$PREPARED" '*train_tr*')
    VALID_TSV=$(find_optional "$PREPARED" '*train_valid*')
else
    TR_TSV=${prefix}_train_tr.tsv
    VALID_TSV=${prefix}_train_valid.tsv
fi
TUNE_INPUTS=
if [ -n "$TR_TSV" ] && [ -n "$VALID_TSV" ]; then
    key="tune train_tr=$TR_TSV train_valid=$VALID_TSV"
    # the tune/ files are outputs too: a split left empty (too little data) gets no tune/
    # folder, and its stamp records them as missing
    set -- "$OUT/converted/train_tr.txt" "$OUT/converted/train_valid.txt" "$OUT/tune/vocab.txt" \
        "$OUT/tune/all_train/train.txt" "$OUT/tune/all_test/test.txt" \
        -- "$TR_TSV" "$VALID_TSV" "$REPO/data/convert_format.py" "$REPO/data/text2paddle.py"
    if fresh tune "$key" "$@"; then
        skip tune
    else
        begin tune
        "$PY" "$REPO/data/convert_format.py" "$TR_TSV" "$OUT/converted/train_tr.txt"
        "$PY" "$REPO/data/convert_format.py" "$VALID_TSV" "$OUT/converted/train_valid.txt"
        rm -rf "$OUT/tune"
        if [ -s "$OUT/converted/train_tr.txt" ] && [ -s "$OUT/converted/train_valid.txt" ]; then
            "$PY" "$REPO/data/text2paddle.py" --out-dir "$OUT/tune" --train "$OUT/converted/train_tr.txt" \
                --test "$OUT/converted/train_valid.txt"
        else
            echo "[tune] the train_tr/train_valid split is empty (too little data); the config gets no tune runner"
        fi
        done_step tune "$key" "$@"
    fi
    [ ! -e "$OUT/tune/vocab.txt" ] || TUNE_INPUTS="$OUT/tune/vocab.txt"
else
    echo "[tune] no train_tr/train_valid split in $PREPARED; the config gets no tune runner"
fi

# 5. a config that trains on this data (and tunes on train_tr -> train_valid) -
key="config config=$CONFIG workspace=$REPO out=$OUT tune=$TUNE_INPUTS"
if [ -n "$TUNE_INPUTS" ]; then
    set -- "$OUT/config.yaml" -- "$CONFIG" "$REPO/data/text2paddle.py" "$TUNE_INPUTS"
else
    set -- "$OUT/config.yaml" -- "$CONFIG" "$REPO/data/text2paddle.py"
fi
if fresh config "$key" "$@"; then
    skip config
else
    begin config
    "$PY" "$REPO/data/text2paddle.py" --out-dir "$OUT" --write-config "$CONFIG" \
        --workspace "$REPO"
    done_step config "$key" "$@"
fi

if [ "$RAN" -eq 0 ]; then
    echo "nothing to do: every output under $OUT is up to date"
fi
echo "ready: python -m paddlerec.run -m $OUT/config.yaml"
