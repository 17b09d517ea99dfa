def test_library_imports_without_torch_being_imported():
    import subprocess
    import sys

    code = "import sys, SegHiResCAMLib; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
