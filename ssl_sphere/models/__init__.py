"""Models: backbones (ResNets, the tiny convnet, split BN), the SSLModel that composes a method with
its regularisers, and the way back from a checkpoint (load_pretrained, export)."""
