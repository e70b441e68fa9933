import XCTest
@testable import KVM
