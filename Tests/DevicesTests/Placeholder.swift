import XCTest
@testable import Devices
