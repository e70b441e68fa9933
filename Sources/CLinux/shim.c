// The ioctl wrappers are static inline in include/clinux.h; this file only makes CLinux a C target.
