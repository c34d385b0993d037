"""The module dependency rules, checked by reading imports."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "layerfs"
CORE = {"union", "whiteout", "entry", "errors", "paths"}
CORE_TREES = CORE | {"lazytree"}


def imported_modules(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:            # from .x import y / from . import x
                names.update([node.module] if node.module else [a.name for a in node.names])
            elif node.module and node.module.startswith("layerfs"):
                names.add(node.module.split(".", 1)[1] if "." in node.module else node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_union_core_imports_only_the_core_and_no_io():
    imports = imported_modules("union")
    project = {name for name in imports if (PACKAGE / f"{name}.py").exists()}
    assert project <= CORE
    assert not imports & {"io", "tarfile", "fuse", "socket", "subprocess", "shutil"}


def test_only_the_binding_loads_libfuse():
    # layerfs.fuse is the binding (mfusepy, libfuse 3) and layerfs.fusell its
    # low-level server; layerfs.mount imports them only when mounting; the
    # translation core (fusecore) imports neither.
    for path in PACKAGE.glob("*.py"):
        imports = imported_modules(path.stem)
        if path.stem != "fuse":
            # fusell (the low-level server) reuses the binding's library.
            assert not imports & {"mfusepy", "fuse"} or path.stem in ("mount", "fusell"), \
                path.name
            assert "mfusepy" not in imports, path.name
    assert not imported_modules("fusecore") & {"fuse", "mount", "mfusepy", "fs", "cli"}
    # The writable server's inode table is core-only: testable without FUSE.
    assert project_imports("fuseinodes") <= CORE


def test_import_layerfs_loads_no_binding_nor_hypothesis():
    code = ("import sys, layerfs, layerfs.fs, layerfs.cli, layerfs.commit, layerfs.fusecore, "
            "layerfs.mount; print('fuse' in sys.modules, 'mfusepy' in sys.modules, "
            "'layerfs.fuse' in sys.modules, 'hypothesis' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False", "False"]


def test_the_reference_grammar_reads_text_only():
    """Which image an argument names is decided by its text: the grammar
    module imports no I/O, and nothing of layerfs but its errors."""
    imports = imported_modules("reference")
    project = {name for name in imports if (PACKAGE / f"{name}.py").exists()}
    assert project <= {"errors"}
    assert not imports & {"io", "tarfile", "socket", "subprocess", "shutil", "pathlib",
                          "glob", "stat"}


def project_imports(module: str) -> set[str]:
    return {name for name in imported_modules(module) if (PACKAGE / f"{name}.py").exists()}


def test_the_registry_modules_point_inwards():
    """The network client knows nothing of images or layers; the settings
    and credentials know nothing of the network client; only the remote
    store joins the client to the cache, and image.py reaches it lazily."""
    assert project_imports("auth") <= {"errors"}
    assert project_imports("registryconf") <= {"errors"}
    assert project_imports("registry") <= {"errors", "auth", "reference", "registryconf"}
    assert project_imports("remote") <= {"errors", "reference", "registry", "registryconf"}
    for module in ("auth", "registryconf", "registry", "remote"):
        assert not project_imports(module) & {"image", "layer", "fs", "union", "cli", "mount"}


def test_import_layerfs_does_not_load_requests():
    code = "import sys, layerfs, layerfs.fs, layerfs.image; print('requests' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


UPPER_STORE = {"upper", "upperformat", "upperload", "sidecar", "hostdir"}


def test_the_upper_store_reaches_neither_the_facade_nor_fuse():
    """The upper store gets narrow interfaces (the tree, the lower view, a
    reader of lower bytes), not the facade; it knows nothing of FUSE, the
    CLI, or how images are read."""
    for module in UPPER_STORE:
        imports = imported_modules(module)
        assert not imports & {"fs", "fuse", "mount", "cli", "image", "layer", "writable",
                              "commit"}, module
        project = {name for name in imports if (PACKAGE / f"{name}.py").exists()}
        assert project <= CORE | UPPER_STORE | {"caller"}, (module, project)


def test_only_the_upper_store_calls_the_host():
    """Every change to an upper goes through layerfs.upper's family of
    operations: nothing outside the store touches HostDir."""
    for path in PACKAGE.glob("*.py"):
        # volume.py walks a mount point with HostDir's no-follow opens to
        # find where to bind a volume; volumefs.py serves a volume's host
        # directory through HostDir (the library's volumes=).  Neither ever
        # touches an upper.
        if path.stem in UPPER_STORE or path.stem in ("volume", "volumefs"):
            continue
        assert "hostdir" not in imported_modules(path.stem), path.name


FUSE_MODULES = {"fuse", "fusell", "fusewrite", "fuseinodes", "fusecore", "mount", "mfusepy"}


def test_the_shared_lower_view_is_core_only():
    assert project_imports("lowerview") <= CORE_TREES
    assert project_imports("lazytree") <= CORE


def top_level_imports(module: str) -> set[str]:
    """The project modules *module* imports when it is imported (not those
    imported inside functions)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level:
            names.update([node.module] if node.module else [a.name for a in node.names])
    return names


def test_the_store_loads_no_fuse_module_when_imported():
    for module in ("store", "volume", "containercli", "storedaemon"):
        assert not top_level_imports(module) & (FUSE_MODULES | {"fs", "cli"}), module
    code = ("import sys, layerfs.store, layerfs.volume, layerfs.containercli, "
            "layerfs.storedaemon; "
            "print(sorted(m for m in sys.modules if m.split('.')[-1] in "
            f"{sorted(FUSE_MODULES)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
