#!/usr/bin/env bash
# Install hf-provenance for the GitHub Action into its own virtual environment and print the interpreter's path
# as the step output `python`.
#
# Inputs arrive as environment variables only (see action.yml): HFP_TORCH (a torch requirement, e.g.
# "torch==2.13.0"; empty: no separate torch install), HFP_TORCH_INDEX_URL (where torch comes from; the CPU index by
# default), HFP_PLOTS ("true" adds the plots extra, i.e. matplotlib for report.html).
#
# HF_PROVENANCE_ACTION_SKIP_INSTALL=1 installs nothing: the interpreter named by HF_PROVENANCE_ACTION_PYTHON (else
# python3) must already import hf_provenance. Tests use it to run the action's steps locally; a workflow can use it
# when an earlier step installed the package.
#
# Everything runs from $RUNNER_TEMP, never from the checked-out model repository, so nothing in that repository
# (a venv.py, a pip/ folder) can be imported by `python -m`.
set -euo pipefail

error() {  # a workflow-command annotation; the message is escaped as GitHub's command rules require
  local msg="$*"
  msg=${msg//'%'/'%25'}
  msg=${msg//$'\r'/'%0D'}
  msg=${msg//$'\n'/'%0A'}
  echo "::error title=hf-provenance%3A install::${msg}"
}

output() {  # step output name=value (values here never contain a newline; checked anyway)
  if [[ $2 == *$'\n'* ]]; then error "output $1 contains a newline"; exit 2; fi
  echo "$1=$2" >> "$GITHUB_OUTPUT"
}

work=${RUNNER_TEMP:-${TMPDIR:-/tmp}}
cd "$work"

if [[ ${HF_PROVENANCE_ACTION_SKIP_INSTALL:-} == 1 ]]; then
  py=${HF_PROVENANCE_ACTION_PYTHON:-$(command -v python3 || true)}
  if [[ -z $py ]] || ! "$py" -P -c 'import hf_provenance' 2>/dev/null; then
    error "HF_PROVENANCE_ACTION_SKIP_INSTALL=1 but ${py:-python3} cannot import hf_provenance" \
      "(install it first or unset HF_PROVENANCE_ACTION_SKIP_INSTALL)"
    exit 2
  fi
  echo "hf-provenance: install skipped (HF_PROVENANCE_ACTION_SKIP_INSTALL=1); using the interpreter given"
  output python "$py"
  exit 0
fi

base_py=$(command -v python3 || command -v python || true)
if [[ -z $base_py ]]; then
  error "no python3 on PATH: set the python-version input (actions/setup-python) or install Python >= 3.11"
  exit 2
fi
if ! "$base_py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  error "$base_py is older than Python 3.11, which hf-provenance needs: set the python-version input (e.g. \"3.12\")"
  exit 2
fi
if [[ ${HFP_TORCH:-} == -* ]]; then
  error "the torch input must be a requirement such as torch==2.13.0, not an option (got a value starting with '-')"
  exit 2
fi

package=$GITHUB_ACTION_PATH
case ${HFP_PLOTS:-true} in
  true) package="$GITHUB_ACTION_PATH[plots]" ;;
  false | "") ;;
  *) error "the plots input must be \"true\" or \"false\""; exit 2 ;;
esac

venv="$work/hf-provenance-venv"
"$base_py" -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check --no-input --quiet)

if [[ -n ${HFP_TORCH:-} ]]; then
  if [[ -n ${HFP_TORCH_INDEX_URL:-} ]]; then
    "${pip[@]}" "--index-url=$HFP_TORCH_INDEX_URL" -- "$HFP_TORCH"
  else
    "${pip[@]}" -- "$HFP_TORCH"
  fi
fi

"${pip[@]}" -- "$package"
"$py" -P -c 'import hf_provenance, sys; print(f"hf-provenance {hf_provenance.__version__}, Python {sys.version.split()[0]}")'
output python "$py"
