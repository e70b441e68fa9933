// swiftlet's version and the git commit it was built from, for --version.

/// The release version; scripts/package names the .deb after it.
let swiftletVersion = "0.1.0"

#if SWIFTLET_BUILD_INFO
/// HEAD when scripts/build-swiftlet ran (BuildInfo.generated.swift, not in git).
let swiftletCommit = buildCommit
#else
let swiftletCommit = "unknown"
#endif
