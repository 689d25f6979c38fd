#!/usr/bin/env bash
# Installs the Debian packages the project needs, only when they are missing.
#   fashion-mnist -> Debian's dataset-fashion-mnist (the demo data, /usr/share/datasets/fashion-mnist)
#   chromium      -> Debian's chromium (the browser test drives it through Playwright; never `playwright install`)
set -euo pipefail
want="$1"
case "$want" in
  fashion-mnist) probe=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz; pkg=dataset-fashion-mnist ;;
  chromium)      probe=/usr/bin/chromium; pkg=chromium ;;
  *) echo "unknown dependency: $want (choose fashion-mnist or chromium)" >&2; exit 2 ;;
esac
[ -e "$probe" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "error: $pkg is not installed and this is not root. Run: sudo apt-get update && sudo apt-get install -y $pkg" >&2
  exit 1
fi
echo "installing Debian package $pkg ..."
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
test -e "$probe" || { echo "error: $pkg installed but $probe is missing" >&2; exit 1; }
