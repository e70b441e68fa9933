import VMM
print("swiftlet: not built yet")
