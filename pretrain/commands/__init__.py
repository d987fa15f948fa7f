"""What each ``pretrain`` command does once its config is resolved: call the implementation,
print the one-paragraph summary a user reads at the end. The registry (``pretrain.stages``)
names these runners as ``module:function`` strings and imports none of them, so ``pretrain
--help`` stays light and nothing below the registry depends on it; each module here imports
its implementation at the top."""
