"""The code brevity's stage scripts share, one module per concern; each script imports the modules it
needs by name (`from brevity.training import TrainSettings`).
"""
