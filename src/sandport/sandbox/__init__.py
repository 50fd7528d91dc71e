"""Sandboxes behind one interface (:mod:`.base`): network namespaces (:mod:`.netns`), QEMU
microVMs (:mod:`.qemu`) and guests another manager runs (:mod:`.external`); their guest
profiles, images and process supervision."""
