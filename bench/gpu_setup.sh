# Source it at the start of a GPU-machine command (bash): installs the wheels that
# bench/gpu_wheels.sh put in .whl/ (carried with the device tool) into /tmp/site once per machine,
# and puts /tmp/site and the repository on PYTHONPATH, /tmp/site/bin (py-spy) on PATH.
#   source bench/gpu_setup.sh
if [ ! -f /tmp/site/.tandem-installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || return 1
    [ ! -f .whl/nixl-cu13.tar.xz ] || tar -xJf .whl/nixl-cu13.tar.xz -C /tmp/site || return 1
    touch /tmp/site/.tandem-installed
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
