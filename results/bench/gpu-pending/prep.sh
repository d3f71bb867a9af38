#!/usr/bin/env bash
# Run here (the CPU machine) before the calls: the tests' tokenizer (.gg, carry it in call 1) and the tree before
# session 12 (probe/old = c335dc3, with the tokenizer; carry probe in call 3), both kept out of git.
set -euo pipefail
cd "$(dirname "$0")/../../.."
[ -d .gg/tokenizer ] || .venv/bin/python -c "from lowbit.models.loader import load_model_files as f; f('smollm2-135m').tokenizer.save_pretrained('.gg/tokenizer')"
if [ ! -d probe/old ]; then
  mkdir -p probe/old && git archive c335dc3 | tar -x -C probe/old && cp -r .gg probe/old/
fi
for p in /.gg/ /probe/; do grep -qxF "$p" .git/info/exclude || echo "$p" >> .git/info/exclude; done
echo "ready: carry .gg (call 1) and probe (call 3); pass the commit: $(git rev-parse --short HEAD)"
