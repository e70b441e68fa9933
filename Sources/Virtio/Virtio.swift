// Virtio module
