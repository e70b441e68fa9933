import XCTest
@testable import Virtio
