"""Guest images for QEMU microVM sandboxes: a Debian kernel and a busybox initramfs.

Owns nothing itself: it names the package's public API (everything callers import as
``from sandport.sandbox.images import X``) and says which module holds what. Must not
grow code; a new job gets a module of its own.

===============  ==========================================================================
module           owns
===============  ==========================================================================
``cpio``         the newc archive format: header, reader, stream writer
``seed``         the per-sandbox seed archive and the initrd a VM boots
``scripts``      the profiles and the guest scripts (``guest/*.sh``) with ``image.env``
``host``         running host programs for the builder; progress; temporary names
``kernel``       the kernel package: resolve, download, extract, decompress to vmlinux
``inputs``       what an image is made from (host plans, packages) and its key
``build``        the cache directory, the lock, assembling the root, lz4, ``build_image``
===============  ==========================================================================

To patch a value in a test, patch it in the module that owns it (``inputs.BUILDER_VERSION``,
``scripts.GUEST_SCRIPTS_DIR``): the names here are copies.

An image is two files in ``<cache>/<profile>-<key[:16]>/``:

``vmlinux``
    The kernel of Debian's ``linux-image-amd64`` (its current ABI package, fetched with
    ``apt-get download``, never installed), decompressed to an ELF that QEMU boots
    through its PVH entry point.
``initramfs.cpio``
    The whole root file system as a cpio archive ("newc" format, written here in Python),
    compressed with ``lz4 -l`` (the *legacy* frame: the only lz4 format the kernel's
    initramfs unpacker reads; it unpacks ~3x faster than gzip in a TCG guest). The kernel
    unpacks it into a ramfs (``rootfstype=ramfs``: a tmpfs root is capped at half the RAM)
    and runs ``/init`` (``guest/init.sh``).

Per profile:

``echo``
    TCP echo on port 7 (busybox ``nc -ll -e cat``), UDP echo on port 7 (``socat``
    ``UDP4-LISTEN:7,fork PIPE``: one process per sender, not per datagram, which a
    loaded TCG guest answers in time; each datagram goes back to its sender; Debian's
    busybox has no inetd and its ``nc`` no UDP), and busybox ``httpd`` on port 80 serving
    ``sandport echo <sandbox id>`` (``guest/echo.sh``).
``desktop``
    TigerVNC's ``Xvnc`` on display :1 / port 5901 with VNC Authentication, then
    ``xsetroot`` (the sandbox's colour), ``openbox`` and an ``xmessage`` naming the sandbox,
    like the netns backend's desktop, and the guest agent when the seed names its gateway
    (``guest/desktop.sh``). These programs, every library ``ldd`` names for them and the
    data they read (XKB, fontconfig, two DejaVu fonts, an openbox theme) are copied from
    the host's installed Debian packages, at their real paths.

**Per-sandbox seed.** The image is shared; what differs per sandbox travels in a second,
uncompressed cpio archive (:func:`seed_archive`) that the backend appends to a copy of
``initramfs.cpio``. Linux unpacks concatenated archives in order, later files overwriting
earlier ones. The seed holds ``/etc/sandport/seed.env`` (shell ``KEY=VALUE`` lines, see
:func:`seed_env`: ``SANDPORT_SANDBOX_ID``, ``SANDPORT_COLOUR``, ``SANDPORT_DESKTOP_NAME``)
and, for a desktop, ``/etc/sandport/vncpasswd`` (TigerVNC's obfuscated password file,
mode 0600). Secrets thus never appear on QEMU's command line, which ``ps`` shows. The
built ``initramfs.cpio`` already ends in zero padding to a 4-byte boundary: the kernel's
lz4 decoder stops at a zero chunk length, and an appended archive must start 4-aligned.

**Booting** (what the QEMU backend does)::

    qemu-system-x86_64 -M microvm -accel tcg -m 256 -smp 1 -nodefaults -display none \\
      -no-reboot -kernel vmlinux -initrd <initramfs.cpio + seed> -serial file:serial.log \\
      -append "<KERNEL_CMDLINE> tsc_early_khz=<host kHz> ip=<guest>::<gw>:<mask>::eth0:off" \\
      -netdev tap,id=n0,ifname=<tap>,script=no,downscript=no \\
      -device virtio-net-device,netdev=n0,mac=<mac>

``ip=`` takes the kernel's own form (Documentation/admin-guide/nfs/nfsroot.rst) or
``ip=dhcp`` (busybox ``udhcpc``); Debian's kernel has no IP autoconfiguration, so
``/init`` reads it. The guest reports on the serial console with :data:`MARKER` lines
(see :mod:`sandport.sandbox.images.scripts`).
"""

from sandport.config import DEFAULT_IMAGE_CACHE
from sandport.sandbox.images.build import (
    INITRD_FILE,
    LOCK_FILE,
    MANIFEST,
    Image,
    build_image,
    find_image,
    list_images,
)
from sandport.sandbox.images.cpio import (
    CPIO_TRAILER,
    NEWC_FIELDS,
    NEWC_HEADER_LEN,
    NEWC_MAGIC,
    CpioEntry,
    CpioWriter,
    NewcHeader,
    read_cpio,
)
from sandport.sandbox.images.host import PACKAGES, Progress
from sandport.sandbox.images.inputs import BUILDER_VERSION, image_inputs, image_key
from sandport.sandbox.images.kernel import (
    DOWNLOADS,
    KERNEL_CMDLINE,
    KERNEL_FILE,
    KERNEL_MEMO,
    KERNEL_METAPACKAGE,
    KERNELS,
    VIRTIO_MODULES,
    KernelPackage,
    resolve_kernel,
)
from sandport.sandbox.images.scripts import (
    AGENT_SOURCE,
    DEFAULT_COLOUR,
    ECHO_PORT,
    GUEST_AGENT,
    GUEST_MODULE_DIR,
    HTTP_PORT,
    IMAGE_PROFILES,
    MARKER,
    XVNC_BLACKLIST_THRESHOLD,
    guest_files,
    init_script,
)
from sandport.sandbox.images.seed import (
    SEED_ENV,
    SEED_VNC_PASSWORD,
    seed_archive,
    seed_env,
    write_initrd,
)

__all__ = [
    "AGENT_SOURCE",
    "BUILDER_VERSION",
    "CPIO_TRAILER",
    "DEFAULT_COLOUR",
    "DEFAULT_IMAGE_CACHE",
    "DOWNLOADS",
    "ECHO_PORT",
    "GUEST_AGENT",
    "GUEST_MODULE_DIR",
    "HTTP_PORT",
    "IMAGE_PROFILES",
    "INITRD_FILE",
    "KERNELS",
    "KERNEL_CMDLINE",
    "KERNEL_FILE",
    "KERNEL_MEMO",
    "KERNEL_METAPACKAGE",
    "LOCK_FILE",
    "MANIFEST",
    "MARKER",
    "NEWC_FIELDS",
    "NEWC_HEADER_LEN",
    "NEWC_MAGIC",
    "PACKAGES",
    "SEED_ENV",
    "SEED_VNC_PASSWORD",
    "VIRTIO_MODULES",
    "XVNC_BLACKLIST_THRESHOLD",
    "CpioEntry",
    "CpioWriter",
    "Image",
    "KernelPackage",
    "NewcHeader",
    "Progress",
    "build_image",
    "find_image",
    "guest_files",
    "image_inputs",
    "image_key",
    "init_script",
    "list_images",
    "read_cpio",
    "resolve_kernel",
    "seed_archive",
    "seed_env",
    "write_initrd",
]
